-- The W3C `traceparent` an event came with (checked: version-00 form, 55 characters), sent with
-- every delivery of it so a receiver's trace continues the producer's. NULL: none came.
ALTER TABLE events ADD COLUMN traceparent text;
