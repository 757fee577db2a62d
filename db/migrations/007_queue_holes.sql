-- Whether a lane's unclaimed queue rows (seq >= cursor) may have gaps in their seq numbers.
-- A first prepare numbers its rows densely (false): the packer then claims `room` rows as the
-- seq range [cursor, cursor + room) without counting them in the index. ON CONFLICT inserts
-- (resume, the catchall lane, re-queued stranded waits) and withdrawals (pause, cancel) may
-- leave gaps (true): the packer counts. Rows from before this column: true (counted).
alter table user_batch_lanes add column holes bool not null default true;
