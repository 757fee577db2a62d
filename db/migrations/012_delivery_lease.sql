-- A delivery being POSTed is leased to that attempt until `sending_until`. The dispatcher hands
-- a delivery whose attempt is still under way to its next run (continue-as-new does not wait for
-- a dead subscriber's retries); the new run's attempt waits for the lease instead of posting it
-- a second time. An attempt whose worker died leaves a lease that simply expires.
alter table deliveries add column sending_until timestamptz;
