"""What the Hub accepts as a model repo id, checked before anything is uploaded (and in
`--dry-run` and the recipe schema, so a bad id never reaches the Hub client's traceback)."""

from __future__ import annotations


def check_repo_id(repo: str) -> str:
    """`repo` if it is a valid `user/name` Hub id, else ValueError saying why."""
    if not isinstance(repo, str) or repo.count("/") != 1 or not all(repo.split("/")):
        raise ValueError(f"a Hub repo id must look like user/name (got {repo!r})")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError as e:
        first = str(e).strip().splitlines()[0]
        raise ValueError(f"{repo!r} is not a valid Hub repo id: {first}") from None
    return repo
