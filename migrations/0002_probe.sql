-- The health probe's write check: each node updates this one row every second (a HOT update of a
-- tiny row), so "the database takes writes" is tested by a write, not by SELECT 1 (which a
-- read-only or full database still answers).
CREATE TABLE triggers_probe (
    id integer PRIMARY KEY,
    at timestamptz NOT NULL
);
INSERT INTO triggers_probe (id, at) VALUES (1, now());
