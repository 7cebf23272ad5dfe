DROP TRIGGER devour_outbox_notify ON devour_outbox;
DROP FUNCTION devour_notify();
DROP TABLE devour_outbox_delivered;
DROP TABLE devour_dead_letters;
DROP TABLE devour_relay_leases;
DROP TABLE devour_relays;
