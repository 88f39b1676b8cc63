"""The gateway as an OAuth 2.0 resource server (the ``api`` section).

Pure checks apart from I/O, as in :mod:`gateway.oidc`:

    claims.py         what an access token says, read and checked (pure)
    jwt_access.py     RFC 9068 JWT access tokens (pure)
    introspection.py  RFC 7662 answers read and checked (pure)
    dpop.py           RFC 9449 proofs, thumbprints, server nonces (pure)
    challenges.py     the WWW-Authenticate values a client acts on (pure)
    gate.py           the request's credential: verify (keys, introspection, replay
                      records, caches) and turn refusals into RFC 6750/9449/9470 401s
"""
