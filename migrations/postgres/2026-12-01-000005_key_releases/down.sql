DROP TABLE devour_key_releases;
