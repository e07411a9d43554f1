"""Sacred ingredients: config entries with defaults and checks, and the factories that turn
a run's config into medseg objects."""

import warnings

# Sacred 0.8.7 imports pkg_resources (hence setuptools<81), whose deprecation notice says
# nothing a user can act on. It is raised once, on that first import: silence it there only,
# without a process-wide filter.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
    import sacred  # noqa: F401
