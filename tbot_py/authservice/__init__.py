"""The cluster side of tbot-py: CAs, bots, join tokens and the HTTPS auth service.

Layout, from the inside out:

* :mod:`.errors`  - server-side errors, each mapped to Teleport's HTTP status.
* :mod:`.ca`      - the cluster's certificate authorities and every certificate
  template (pure: the caller passes keys and ``now``).
* :mod:`.storage` - the state database (SQLite by default): schema, migrations, transactions.
* :mod:`._postgres` - the PostgreSQL backend, shared by replicas (the only psycopg user).
* :mod:`._sql`    - the dialect layer every store's queries run through.
* :mod:`.bots_store` - the bots table (``Storage.bots``).
* :mod:`.tokens_store` - hashed join tokens (``Storage.tokens``).
* :mod:`.instances_store` - bot instances: join, renewal generations, retries
  (``Storage.instances``).
* :mod:`.roles_store` - the roles table (``Storage.roles``).
* :mod:`.locks`   - locks on a bot or a bot instance (``Storage.locks``), and the
  instance lock made when a renewal presents the wrong generation.
* :mod:`.ca_store` - the CAs in PostgreSQL (``Storage.cert_authorities``).
* :mod:`.cluster` - the data directory: CA key files, the database, the init lock.
* :mod:`.admin`   - offline admin operations (add bot, add token, list, remove).
* :mod:`.mtls`    - the mTLS caller check: only a bot's own renewable certificate.
* :mod:`.app`     - the aiohttp application: handlers, errors.
* :mod:`.server`  - TLS context and running the service (foreground or in a thread).

The daemon never imports this package.
"""
