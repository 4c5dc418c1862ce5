-- sqlite's instr(), which the index's queries use, as PostgreSQL spells it.
CREATE FUNCTION instr(haystack TEXT, needle TEXT) RETURNS INTEGER
    LANGUAGE sql IMMUTABLE AS 'SELECT strpos(haystack, needle)';
