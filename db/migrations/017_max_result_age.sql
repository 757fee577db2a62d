-- A user batch may reuse only results younger than this (seconds; NULL: RESULT_TTL_DAYS). A
-- recurring run sets half its period, so each run verifies its list again.
alter table user_batches add column max_result_age_s double precision;
