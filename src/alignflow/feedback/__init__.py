"""The annotation platform behind `alignflow serve`.

Modules (import direction top to bottom; nothing below `app` imports FastAPI):
    app       FastAPI app factory: settings, security middleware (CSP, HSTS, body limit), error mapping
    api       JSON routes under /api/v1 (OpenAPI at /api/v1/openapi.json)
    pages     server-rendered Jinja2 pages (annotate, review, lead/admin) with htmx polling and keyboard JS
    deps      request dependencies both route modules share: DB session, principal, `require`, cookies
    services  (a package) the library entry points the routes, the CLI and the quickstart share, every
              write included: projects, items, tasks, users/tokens/QC (with `can_manage`), views
    engine    the assignment engine: leases, overlap, gold mixing, QA routing, tiers, QC enforcement
    auth      argon2 passwords, sessions, scoped API tokens, login rate limiting
    schema    versioned question schemas and answer validation (display order -> canonical labels)
    qc        quality figures and QC actions through `alignflow.quality`
    export    preference dataset export with lineage to every individual judgment
    loadgen   bounded loopback load generator and SIGKILL crash harness (tests and benchmarks)
    models    the fb_* tables (migration 0002); journal: the append-only change log

Static assets: `static/htmx.min.js` is htmx 2.0.11 (0BSD, licence beside it) vendored from the npm package
`htmx.org`, so nothing is fetched at run time; `static/app.js` holds the keyboard shortcuts.
"""
