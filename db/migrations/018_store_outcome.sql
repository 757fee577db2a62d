-- What a batch's store did, written in its commit: a retry of that store (its signals failed
-- after the commit, its worker died) finds the batch stored and returns the same outcome, so
-- its workflow still wakes the next lane's scheduler for the addresses the store handed off.
-- NULL for batches stored before this migration.
alter table bouncer_batches
    add column results_stored int,
    add column requeued int,
    add column dead_lettered int,
    add column handed_off int;
