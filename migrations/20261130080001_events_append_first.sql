-- ADR 0017: the log's watermark waits only for transactions that write to `events`. It
-- finds them by their lock on the table. That is sound only if a transaction's id is never
-- older than its lock on `events`: a statement locks its tables before it writes, so the
-- first write of an events writer must be to `events`. This trigger refuses an append by a
-- transaction that already has an id (it wrote something else first) and has not appended
-- before; such a transaction could hide its events below a reader's cursor. Appending first,
-- then writing elsewhere in the same transaction, stays allowed.
CREATE FUNCTION events_append_first() RETURNS trigger
    LANGUAGE plpgsql AS
$$
BEGIN
    IF pg_current_xact_id_if_assigned() IS NOT NULL
       AND current_setting('ledger.appending', true) IS DISTINCT FROM 'on' THEN
        RAISE EXCEPTION 'an append to events must be the first write of its transaction'
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  DETAIL = 'This transaction wrote to another table before appending; log '
                           'readers could read past its events (ADR 0017).',
                  HINT = 'Append in a transaction of its own, or before any other write.';
    END IF;
    PERFORM set_config('ledger.appending', 'on', true);
    RETURN NULL;
END
$$;

CREATE TRIGGER events_append_first
    BEFORE INSERT ON events
    FOR EACH STATEMENT
EXECUTE FUNCTION events_append_first();
