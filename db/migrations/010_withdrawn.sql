-- A paused user batch's addresses taken off the queue (sent again on resume). While paused,
-- `remaining` counts only the in-flight ones, so the settled count is
-- unique_addresses - remaining - withdrawn; 0 when not paused.
alter table user_batch_lanes add column withdrawn bigint not null default 0;
