-- A cancelled row whose address was verified (before the cancel, or sent in a batch already at
-- the API: paid for) shows that verdict; its state stays `cancelled`.
create or replace view item_outcomes as
select i.user_batch_id, i.row_no, i.raw, i.email,
       case when i.state = 'pending' and r.status is not null then 'verified' else i.state end as state,
       i.reason as note,
       r.status, r.reason, r.score, r.accept_all, r.verified_at, r.record,
       c.status as catchall_status, c.reason as catchall_reason, c.score as catchall_score,
       c.verified_at as catchall_verified_at
from items i
join user_batches b on b.id = i.user_batch_id
left join addresses a on a.email = i.email and i.state in ('pending', 'duplicate', 'cancelled')
left join results r on r.address_id = a.id and r.lane = b.lanes[1]
left join results c on c.address_id = a.id and c.lane = 'catchall' and 'catchall' = any(b.lanes);
