-- Operator tools: projection versions and the audit of dead-letter actions.

-- Which version of each projection's code built the deployed read model; a projector
-- whose projection declares another version says a rebuild is needed.
CREATE TABLE projection_versions
(
    projection text PRIMARY KEY,
    version    integer     NOT NULL,
    built_at   timestamptz NOT NULL DEFAULT now()
);

-- Every action an operator takes on a dead letter: who, when, what came of it.
CREATE TABLE dead_letter_actions
(
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    dead_letter_id bigint      NOT NULL REFERENCES dead_letters (id),
    action         text        NOT NULL,
    actor          text        NOT NULL,
    outcome        text        NOT NULL,
    at             timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX dead_letter_actions_letter_idx ON dead_letter_actions (dead_letter_id, id);
