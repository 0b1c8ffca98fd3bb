-- A message re-delivered after a crash (Kafka offsets are committed after the batch) or
-- handled by two process managers at once was dead-lettered again each time: the letters of
-- unreadable messages and of the transfer process manager are not behind a guard. One
-- letter per projection and event (or, for a message that is not even an event, per Kafka
-- partition and offset) among those not superseded by a rebuild; writers insert with
-- ON CONFLICT DO NOTHING (ADR 0014). Duplicates already recorded are marked superseded.
UPDATE dead_letters d
   SET status = 'superseded'
 WHERE status <> 'superseded'
   AND EXISTS (SELECT 1 FROM dead_letters o
                WHERE o.status <> 'superseded' AND o.id < d.id AND o.projection = d.projection
                  AND ((d.event_id IS NOT NULL AND o.event_id = d.event_id)
                    OR (d.event_id IS NULL AND o.event_id IS NULL
                        AND o.kafka_partition = d.kafka_partition
                        AND o.kafka_offset = d.kafka_offset)));

CREATE UNIQUE INDEX dead_letters_event_once ON dead_letters (projection, event_id)
    WHERE event_id IS NOT NULL AND status <> 'superseded';

CREATE UNIQUE INDEX dead_letters_message_once
    ON dead_letters (projection, kafka_partition, kafka_offset)
    WHERE event_id IS NULL AND kafka_offset IS NOT NULL AND status <> 'superseded';
