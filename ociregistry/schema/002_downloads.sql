-- Downloads in progress, one owner each across every replica sharing the index:
-- the replica named by owner fetches the content from upstream, the others stream
-- it from that replica.  The owner renews its lease while it downloads and deletes
-- the row when it ends; a lease past its expiry (the owner died) is taken over by
-- the next replica that claims the digest.  Times are UTC, ISO 8601, by the
-- claiming replica's clock.
CREATE TABLE downloads (
    registry    TEXT NOT NULL,   -- the namespace it is fetched from, e.g. docker.io
    digest      TEXT NOT NULL,
    owner       TEXT NOT NULL,   -- the advertise URL of the replica downloading it
    expires     TEXT NOT NULL,   -- when the lease ends unless the owner renews it
    started     TEXT NOT NULL,   -- when this owner claimed it
    PRIMARY KEY (registry, digest)
);
CREATE INDEX downloads_by_owner ON downloads (owner);
