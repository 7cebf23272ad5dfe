DROP TABLE devour_outbox;
