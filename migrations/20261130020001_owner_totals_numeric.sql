-- An owner's total balance is the sum of many accounts' bigint balances, which can exceed
-- the largest bigint (2^63 - 1 minor units) although every account stays within it. As a
-- bigint the sum overflowed and the projector retried its batch for ever; as numeric it is
-- exact for any number of accounts (ADR 0013). One account's balance stays bigint
-- (account_summaries, account_statements, owner_total_accounts): an event that would take it
-- beyond is refused by the projection and dead-lettered with the reason.
ALTER TABLE owner_totals
    ALTER COLUMN balance TYPE numeric;
