"""Sacred ingredients: config entries with defaults and checks, and the factories that turn
a run's config into medseg objects."""

import functools
import os
import warnings

# Sacred 0.8.7 imports pkg_resources (hence setuptools<81), whose deprecation notice says
# nothing a user can act on. It is raised once, on that first import: silence it there only,
# without a process-wide filter.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
    import sacred  # noqa: F401
    import sacred.dependencies


def _work_tree(filename: str) -> str | None:
    """The folder holding the ``.git`` of the repository ``filename`` is in (None outside one)."""
    folder = os.path.dirname(os.path.abspath(filename))
    while True:
        if os.path.exists(os.path.join(folder, ".git")):
            return folder
        parent = os.path.dirname(folder)
        if parent == folder:
            return None
        folder = parent


def _commit_once_per_repository(get_commit):
    """Sacred asks git for the commit and dirty state of every source file of every ingredient
    when it is built (three git processes each: 131 for one SADAAN experiment, about half its
    start-up time); the answer is the repository's, so it is asked once per repository.
    The answers last until ``forget()`` (which every experiment calls once built): a
    long-lived process (a notebook) that builds another experiment after a file changed records
    the repository as it is then, dirty or committed anew."""
    @functools.lru_cache(maxsize=None)
    def of_repository(tree):
        return get_commit(os.path.join(tree, ".git"), True)

    @functools.wraps(get_commit)
    def get_commit_if_possible(filename, save_git_info):
        tree = _work_tree(filename)
        if tree is None or not save_git_info:
            return get_commit(filename, save_git_info)
        return of_repository(tree)

    get_commit_if_possible.forget = of_repository.cache_clear
    return get_commit_if_possible


sacred.dependencies.get_commit_if_possible = _commit_once_per_repository(
    sacred.dependencies.get_commit_if_possible)
