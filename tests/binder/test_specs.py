"""Launch spec parsing (:mod:`broker.specs`): every provider form of
docs/protocols.md#binderhub-launch-api."""

from __future__ import annotations

import pytest

from broker.errors import BadRequest
from broker.specs import MAX_SPEC, parse_spec


@pytest.mark.parametrize(
    ("path", "provider", "spec", "repo_url", "ref"),
    [
        ("gh/owner/repo/HEAD", "gh", "owner/repo/HEAD", "https://github.com/owner/repo", "HEAD"),
        ("gh/owner/repo/feature/x", "gh", "owner/repo/feature/x",
         "https://github.com/owner/repo", "feature/x"),
        ("gh/owner/repo/feature%2Fy/", "gh", "owner/repo/feature%2Fy",
         "https://github.com/owner/repo", "feature/y"),
        ("gh/Owner-1/my.repo_x/0123abcd", "gh", "Owner-1/my.repo_x/0123abcd",
         "https://github.com/Owner-1/my.repo_x", "0123abcd"),
        ("gl/group%2Fsub%2Fproject/main", "gl", "group%2Fsub%2Fproject/main",
         "https://gitlab.com/group/sub/project", "main"),
        ("git/https%3A%2F%2Fexample.org%2Fr.git/v1.0", "git",
         "https%3A%2F%2Fexample.org%2Fr.git/v1.0", "https://example.org/r.git", "v1.0"),
        ("gist/someone/8f1a2b3c4d5e", "gist", "someone/8f1a2b3c4d5e",
         "https://gist.github.com/someone/8f1a2b3c4d5e", ""),
        ("gist/someone/8f1a2b3c4d5e/main", "gist", "someone/8f1a2b3c4d5e/main",
         "https://gist.github.com/someone/8f1a2b3c4d5e", "main"),
        ("zenodo/10.5281/zenodo.3242074", "zenodo", "10.5281/zenodo.3242074",
         "https://doi.org/10.5281/zenodo.3242074", ""),
        ("figshare/10.6084/m9.figshare.9782777.v1", "figshare", "10.6084/m9.figshare.9782777.v1",
         "https://doi.org/10.6084/m9.figshare.9782777.v1", ""),
        ("dataverse/10.7910/DVN/TJCLKP", "dataverse", "10.7910/DVN/TJCLKP",
         "https://doi.org/10.7910/DVN/TJCLKP", ""),
        ("hydroshare/b8f6eae9d89241cf8b5904033460af61", "hydroshare",
         "b8f6eae9d89241cf8b5904033460af61",
         "https://www.hydroshare.org/resource/b8f6eae9d89241cf8b5904033460af61", ""),
        ("ckan/https%3A%2F%2Fdemo.ckan.org%2Fdataset%2Fsample", "ckan",
         "https%3A%2F%2Fdemo.ckan.org%2Fdataset%2Fsample", "https://demo.ckan.org/dataset/sample",
         ""),
    ],
)
def test_accepted_forms(path: str, provider: str, spec: str, repo_url: str, ref: str) -> None:
    parsed = parse_spec(path)
    assert (parsed.provider, parsed.spec, parsed.repo_url, parsed.ref) == (
        provider, spec, repo_url, ref)
    # The canonical form keeps the escapes exactly as sent.
    assert parsed.path == f"{provider}/{spec}"
    assert parsed.binder_request == f"v2/{provider}/{spec}"


def test_github_ref_url_points_at_the_ref() -> None:
    assert parse_spec("gh/o/r/dev").ref_url == "https://github.com/o/r/tree/dev"
    assert parse_spec("gl/g%2Fp/dev").ref_url == "https://gitlab.com/g/p/-/tree/dev"


@pytest.mark.parametrize(
    ("path", "fragment"),
    [
        ("", "is required"),
        ("gh", "is empty"),
        ("svn/owner/repo/HEAD", "No provider found for prefix 'svn'"),
        ("gh/owner/repo", "gh/{user}/{repo}/{ref}"),
        ("gh/-owner/repo/HEAD", "not a GitHub user"),
        ("gh/owner/../HEAD", "'.' or '..' segments"),
        ("gh/owner//repo/HEAD", "empty"),
        ("gh/owner/repo/a..b", "not a valid git ref"),
        ("gh/owner/repo/x.lock", "not a valid git ref"),
        ("gh/owner/repo/%2e%2e", "not a valid git ref"),
        ("gh/owner/repo/a%20b", "not a valid git ref"),
        ("gh/owner/repo/HEAD%0a", "control characters"),
        ("gh/owner/repo/%zz", "not allowed"),
        ("gh/owner/repo/%ff", "UTF-8"),
        ("gh/owner/repo/HEAD?x=1", "not allowed"),
        ("gh/owner/repo/a\"b", "not allowed"),
        ("gl/project/main", "group%2Fproject"),
        ("gl/group%2F..%2Fx/main", "group%2Fproject"),
        ("gl/group%2Fproject", "gl/{url-escaped namespace}/{ref}"),
        ("git/file%3A%2F%2F%2Fetc%2Fpasswd/HEAD", "https or http or git URL"),
        ("git/https%3A%2F%2Fu%3Ap%40example.org%2Fr/HEAD", "credentials"),
        ("git/https%3A%2F%2Fexample.org%2Fr", "git/{url-escaped clone URL}/{ref}"),
        ("gist/someone/not-hex", "not a gist id"),
        ("gist/someone", "gist/{user}/{id}[/{ref}]"),
        ("zenodo/zenodo.3242074", "DOI"),
        ("hydroshare/1234", "32 hex digits"),
        ("ckan/ftp%3A%2F%2Fexample.org%2Fd", "https or http URL"),
        ("gh/owner/repo/" + "x" * MAX_SPEC, "longer than"),
    ],
)
def test_rejected_forms(path: str, fragment: str) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_spec(path)
    assert caught.value.reason == "bad_spec"
    assert caught.value.status == 400
    assert fragment in caught.value.message
