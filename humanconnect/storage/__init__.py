"""Storage: the database (engine, tables, migrations), each session's record, the tokens."""
