DROP RULE devour_outbox_notify ON devour_outbox;
DROP TABLE devour_outbox_delivered;
DROP TABLE devour_dead_letters;
DROP TABLE devour_relay_leases;
DROP TABLE devour_relays;
