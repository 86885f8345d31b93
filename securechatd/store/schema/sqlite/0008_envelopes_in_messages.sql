-- An encrypted message is one messages row: its header, encrypted body
-- (`sealed`), sending device and header counter move here from `envelopes`,
-- so storing one costs one row instead of two (and no counters row); `body`
-- stays '' for it. The highest counter per sending device and conversation
-- is read from the messages themselves, through a partial index that only
-- encrypted messages enter.
ALTER TABLE messages ADD COLUMN sender_device TEXT;
ALTER TABLE messages ADD COLUMN header BLOB;
ALTER TABLE messages ADD COLUMN sealed BLOB;
ALTER TABLE messages ADD COLUMN counter BLOB;
UPDATE messages SET sender_device = e.sender_device, header = e.header, sealed = e.body
FROM envelopes e WHERE e.message_id = messages.id;
-- (only the highest counter matters: it goes on the device's newest message there)
UPDATE messages SET counter = c.counter
FROM sender_counters c
WHERE messages.id = (
    SELECT MAX(m.id) FROM messages m
    WHERE m.conversation_id = c.conversation_id AND m.sender_id = c.user_id AND m.sender_device = c.device_id
);
CREATE INDEX messages_by_sending_device ON messages (conversation_id, sender_id, sender_device, counter)
WHERE sender_device IS NOT NULL;
DROP TABLE envelopes;
DROP TABLE sender_counters;
