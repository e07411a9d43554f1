"""Sacred ingredients: config entries with defaults and checks, and the factories that turn
a run's config into medseg objects."""

import warnings

# Sacred 0.8.7 imports pkg_resources (hence setuptools<81); the deprecation notice it
# triggers on every run says nothing a user can act on.
warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
