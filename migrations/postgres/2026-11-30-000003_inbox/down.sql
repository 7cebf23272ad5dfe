DROP TABLE devour_inbox;
