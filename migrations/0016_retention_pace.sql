-- The pace of retention: when a maintenance round last dropped partitions, by the clock it went
-- by (the earlier of the node's and the database's, in ms since 1970). A round drops at most one
-- day of each table, and only when the last drop was at least an hour before by that clock, so a
-- clock that jumps weeks ahead (a small box that boots with a wrong real-time clock, where node and
-- database share the clock) or a node that restarts in a loop drops at most a day an hour, not the
-- whole retention window at once. One row, written only by the round that holds the retention lock.
CREATE TABLE triggers_retention (
    id           integer PRIMARY KEY CHECK (id = 1),
    last_drop_ms bigint NOT NULL
);
