"""BinderHub launch specs: the ``{provider}/{spec}`` part of a ``/build`` URL.

BinderHub takes the spec from the *raw* request path, so an escaped
``%2F`` (GitLab namespaces, git clone URLs) stays escaped and tells apart
"one path segment" from "several". The broker does the same: the canonical
form it stores, keys reuse on and hands to an upstream BinderHub is exactly
what the page asked for, minus a trailing slash (BinderHub strips it too).

Validation is stricter than "whatever some provider might accept": a spec
becomes part of an upstream URL, a hub's ``user_options`` and a reuse key,
so anything malformed is refused (400, reason ``bad_spec``) before a spawn
starts. The forms accepted are those of docs/protocols.md#binderhub-launch-api:

=============================  ================================================
``gh/{user}/{repo}/{ref}``     ref may contain ``/``; ``HEAD`` = default branch
``gl/{namespace}/{ref}``       namespace url-escaped (``group%2Fproject``)
``git/{clone url}/{ref}``      clone url url-escaped; http(s) or git only
``gist/{user}/{id}[/{ref}]``
``zenodo|figshare|dataverse/{doi}``   ``10.{registrant}/{suffix}``
``hydroshare/{id}``            32 hex digits
``ckan/{url}``                 http(s) dataset URL (escaped or not)
=============================  ================================================
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from broker.errors import BadRequest

#: Longest ``provider/spec`` accepted (BinderHub specs are short; DOIs and
#: clone URLs are the long ones).
MAX_SPEC = 1024
PROVIDERS = ("gh", "gl", "git", "gist", "zenodo", "figshare", "dataverse", "hydroshare", "ckan")

# Characters a raw spec may contain: unreserved, sub-delims (DOIs use some),
# ':' '@' and percent-escapes. No '?', '#', quotes, spaces, backslashes.
_RAW = re.compile(r"^[A-Za-z0-9._~\-/%:@+!$&()*,;=]+$")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_GH_USER = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9]|-(?=[A-Za-z0-9])){0,38}$")
_REPO = re.compile(r"^[A-Za-z0-9._\-]{1,100}$")
_NAMESPACE_PART = re.compile(r"^[A-Za-z0-9._\-]{1,255}$")
_GIST_ID = re.compile(r"^[0-9A-Fa-f]{1,64}$")
_HYDROSHARE_ID = re.compile(r"^[0-9A-Fa-f]{32}$")
_DOI = re.compile(r"^10\.\d{4,9}/\S+$")
# git check-ref-format, the parts that matter here.
_REF_FORBIDDEN = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]|\.\.|@\{|//")


@dataclass(frozen=True)
class BuildSpec:
    """One validated launch spec and what is known about it without asking anyone."""

    provider: str
    #: The spec as it appeared in the URL (still escaped), without a trailing slash.
    spec: str
    repo_url: str = ""
    #: The unresolved ref, decoded ("" for providers without refs).
    ref: str = ""
    ref_url: str = ""

    @property
    def path(self) -> str:
        """``provider/spec``: the canonical form stored as a session's spec."""
        return f"{self.provider}/{self.spec}"

    @property
    def binder_request(self) -> str:
        """BinderHub's ``binder_request`` field for this spec."""
        return f"v2/{self.path}"


def _bad(message: str) -> BadRequest:
    return BadRequest(message, reason="bad_spec")


def _decode(raw: str, what: str) -> str:
    text = unquote(raw, errors="strict")
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise _bad(f"The {what} contains control characters")
    return text


def _check_ref(ref: str) -> str:
    if not ref or len(ref) > 255:
        raise _bad("A ref (branch, tag or commit; HEAD for the default branch) is required")
    if (
        _REF_FORBIDDEN.search(ref)
        or ref.startswith(("/", "-"))
        or ref.endswith(("/", ".", ".lock"))
        or ref == "@"
        or any(part.startswith(".") for part in ref.split("/"))
    ):
        raise _bad(f"{ref!r} is not a valid git ref")
    return ref


def _check_url(url: str, schemes: tuple[str, ...], what: str) -> str:
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise _bad(f"The {what} is not a valid URL") from exc
    if parts.scheme not in schemes or not parts.hostname:
        raise _bad(f"The {what} must be an {' or '.join(schemes)} URL with a host")
    if "@" in parts.netloc:
        raise _bad(f"The {what} may not carry credentials")
    return url


def _gh(spec: str) -> BuildSpec:
    parts = spec.split("/", 2)
    if len(parts) != 3:
        raise _bad("A GitHub spec has the form gh/{user}/{repo}/{ref}")
    user, repo, raw_ref = parts
    if not _GH_USER.match(user):
        raise _bad(f"{user!r} is not a GitHub user or organisation name")
    if not _REPO.match(repo) or repo in (".", ".."):
        raise _bad(f"{repo!r} is not a GitHub repository name")
    ref = _check_ref(_decode(raw_ref, "ref"))
    repo_url = f"https://github.com/{user}/{repo}"
    return BuildSpec("gh", spec, repo_url, ref, f"{repo_url}/tree/{ref}")


def _gl(spec: str) -> BuildSpec:
    raw_namespace, sep, raw_ref = spec.partition("/")
    if not sep:
        raise _bad("A GitLab spec has the form gl/{url-escaped namespace}/{ref}")
    namespace = _decode(raw_namespace, "namespace")
    parts = namespace.split("/")
    if len(parts) < 2 or any(not _NAMESPACE_PART.match(p) or p in (".", "..") for p in parts):
        raise _bad("A GitLab namespace is group%2Fproject (subgroups allowed), url-escaped")
    ref = _check_ref(_decode(raw_ref, "ref"))
    repo_url = f"https://gitlab.com/{namespace}"
    return BuildSpec("gl", spec, repo_url, ref, f"{repo_url}/-/tree/{ref}")


def _git(spec: str) -> BuildSpec:
    raw_url, sep, raw_ref = spec.partition("/")
    if not sep:
        raise _bad("A git spec has the form git/{url-escaped clone URL}/{ref}")
    url = _check_url(_decode(raw_url, "clone URL"), ("https", "http", "git"), "clone URL")
    ref = _check_ref(_decode(raw_ref, "ref"))
    return BuildSpec("git", spec, url, ref)


def _gist(spec: str) -> BuildSpec:
    parts = spec.split("/", 2)
    if len(parts) < 2:
        raise _bad("A gist spec has the form gist/{user}/{id}[/{ref}]")
    user, gist_id = parts[0], parts[1]
    if not _GH_USER.match(user):
        raise _bad(f"{user!r} is not a GitHub user name")
    if not _GIST_ID.match(gist_id):
        raise _bad(f"{gist_id!r} is not a gist id")
    ref = _check_ref(_decode(parts[2], "ref")) if len(parts) == 3 else ""
    return BuildSpec("gist", spec, f"https://gist.github.com/{user}/{gist_id}", ref)


def _doi(provider: str, spec: str) -> BuildSpec:
    doi = _decode(spec, "DOI")
    if not _DOI.match(doi) or any(part in (".", "..") for part in doi.split("/")):
        raise _bad(f"A {provider} spec is a DOI such as 10.5281/zenodo.3242074")
    return BuildSpec(provider, spec, f"https://doi.org/{doi}")


def _hydroshare(spec: str) -> BuildSpec:
    if not _HYDROSHARE_ID.match(spec):
        raise _bad("A HydroShare spec is a resource id of 32 hex digits")
    return BuildSpec("hydroshare", spec, f"https://www.hydroshare.org/resource/{spec}")


def _ckan(spec: str) -> BuildSpec:
    url = _check_url(_decode(spec, "dataset URL"), ("https", "http"), "CKAN dataset URL")
    return BuildSpec("ckan", spec, url)


def parse_spec(path: str) -> BuildSpec:
    """Validate ``provider/spec`` as found in a raw ``/build/`` path (or a session's spec).

    Raises :class:`~broker.errors.BadRequest` (reason ``bad_spec``) with a
    message a page author can act on.
    """
    path = path.rstrip("/")
    if not path:
        raise _bad("A spec of the form {provider}/{spec} is required, e.g. gh/owner/repo/HEAD")
    if len(path) > MAX_SPEC:
        raise _bad(f"The spec is longer than {MAX_SPEC} characters")
    if not _RAW.match(path) or _BAD_ESCAPE.search(path):
        raise _bad("The spec contains characters that are not allowed in a launch URL")
    provider, _, spec = path.partition("/")
    if provider not in PROVIDERS:
        raise _bad(f"No provider found for prefix {provider!r}; known: {', '.join(PROVIDERS)}")
    if not spec:
        raise _bad(f"The {provider} spec is empty")
    if any(segment in ("", ".", "..") for segment in spec.split("/")):
        raise _bad("The spec may not contain empty, '.' or '..' segments")
    try:
        if provider == "gh":
            return _gh(spec)
        if provider == "gl":
            return _gl(spec)
        if provider == "git":
            return _git(spec)
        if provider == "gist":
            return _gist(spec)
        if provider == "hydroshare":
            return _hydroshare(spec)
        if provider == "ckan":
            return _ckan(spec)
        return _doi(provider, spec)
    except UnicodeDecodeError as exc:
        raise _bad("The spec's escapes do not decode as UTF-8") from exc
