"""HTTP routes, one module per resource; ``ROUTERS`` is what the app mounts."""

from service.routes import admin, encode, generate, health, jobs, models, traverse, ui

ROUTERS = [
    models.router,
    generate.router,
    encode.router,
    traverse.router,
    jobs.router,
    admin.router,
    health.router,
    ui.router,
]
