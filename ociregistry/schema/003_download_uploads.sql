-- The multipart upload the owner of a download writes the blob to, once it has begun
-- one: the owner's next life (after a crash) or a replica that takes the lease over
-- aborts it, so that no upload is left behind however long abandonUploadsAfter is.
ALTER TABLE downloads ADD COLUMN upload_key TEXT;   -- the object's key, without the bucket's prefix
ALTER TABLE downloads ADD COLUMN upload_id TEXT;    -- the store's UploadId
