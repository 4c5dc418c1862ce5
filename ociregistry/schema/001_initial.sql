-- Manifests (image manifests, indexes and lists) stored under blobs/ by digest.
-- Times are UTC, ISO 8601 ("2026-01-31T12:00:00Z"), so sqlite's date functions read them.
CREATE TABLE manifests (
    digest      TEXT PRIMARY KEY,
    media_type  TEXT NOT NULL,
    size        BIGINT NOT NULL,
    registry    TEXT NOT NULL,   -- where it was first fetched from, e.g. docker.io
    repository  TEXT NOT NULL,   -- e.g. library/nginx
    created     TEXT NOT NULL,   -- when it entered the cache
    pulled      TEXT NOT NULL    -- when a client last pulled it
);

-- Tags point at manifests; a tag moves when upstream moves it.
CREATE TABLE tags (
    registry    TEXT NOT NULL,
    repository  TEXT NOT NULL,
    tag         TEXT NOT NULL,
    digest      TEXT NOT NULL REFERENCES manifests (digest) ON DELETE CASCADE,
    updated     TEXT NOT NULL,   -- when the tag was last confirmed upstream
    PRIMARY KEY (registry, repository, tag)
);
CREATE INDEX tags_by_digest ON tags (digest);

-- What each manifest refers to: an index or list to its platform manifests
-- (kind 'manifest'), an image manifest to its config and layers.
CREATE TABLE manifest_refs (
    manifest    TEXT NOT NULL REFERENCES manifests (digest) ON DELETE CASCADE,
    child       TEXT NOT NULL,
    kind        TEXT NOT NULL CHECK (kind IN ('manifest', 'config', 'layer')),
    media_type  TEXT NOT NULL,
    size        BIGINT NOT NULL,
    platform    TEXT,            -- e.g. linux/arm64/v8, for an index's entries
    PRIMARY KEY (manifest, child, kind)
);
CREATE INDEX manifest_refs_by_child ON manifest_refs (child);

-- Config and layer blobs on disk.
CREATE TABLE blobs (
    digest      TEXT PRIMARY KEY,
    size        BIGINT NOT NULL,
    created     TEXT NOT NULL
);

-- How many cached manifests use each blob; a blob at zero may be pruned.
CREATE VIEW blob_refcounts AS
    SELECT b.digest, b.size,
           (SELECT count(*) FROM manifest_refs r
             WHERE r.child = b.digest AND r.kind IN ('config', 'layer')) AS refcount
      FROM blobs b;

-- One row per tagged image, for people reading the cache with sqlite3.
CREATE VIEW images AS
    SELECT t.registry || '/' || t.repository AS image, t.tag, m.digest, m.media_type,
           m.created, m.pulled,
           m.size + coalesce((SELECT sum(size) FROM manifest_refs r WHERE r.manifest = m.digest), 0)
             + coalesce((SELECT sum(r2.size) FROM manifest_refs r1
                          JOIN manifest_refs r2 ON r2.manifest = r1.child
                         WHERE r1.manifest = m.digest AND r1.kind = 'manifest'), 0) AS total_size
      FROM tags t JOIN manifests m ON m.digest = t.digest;

CREATE VIEW blobs_unreferenced AS
    SELECT digest, size FROM blob_refcounts WHERE refcount = 0;
