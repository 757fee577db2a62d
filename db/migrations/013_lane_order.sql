-- A list's first lane is the one whose verdict its rows show (`item_outcomes`, the summary):
-- always deliverability (catchall only re-verifies its accept-all results). Lists submitted as
-- `catchall,deliverability` before submissions put the lanes in order showed the catch-all
-- verdict instead, or `failed` for rows the catchall lane never saw.
update user_batches set lanes = array['deliverability', 'catchall']
where lanes = array['catchall', 'deliverability'];
