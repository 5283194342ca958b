"""Checked download of the CoRE city files.

The files come from the authors' public repository ``AIMUrban/CoRE`` pinned at
one commit, and every file is verified against a SHA-256 recorded here, so a
download either yields exactly the bytes the project was developed on or
fails loudly. Files are written into our data-root layout::

    <dest>/core/<city>/regionmap_<city>.geo
    <dest>/core/<city>/regionmap_<city>.mob
    <dest>/core/<city>/{gdp,population,co2}_<city>_sum.npy

so ``<dest>`` can be used directly as ``--data-root`` / ``$JAXURBAN_DATA``.

Command line::

    python -m jaxurban.data.fetch core xa cd bj [--dest DIR]

The authors' full origin-destination matrices (``region_od_flow_<city>_11.npy``)
are not fetched: they are too large for the repository's raw file service.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import pathlib
import ssl
import sys
import urllib.error
import urllib.request
from collections.abc import Callable

from jaxurban.atomic import atomic_write, path_argument
from jaxurban.data.core_city import city_files, is_city_dir
from jaxurban.data.errors import DataError
from jaxurban.data.root import DATA_ENV, list_subfolders, resolve_data_root
from jaxurban.digest import file_sha256 as sha256_file

__all__ = [
  "CACHE_ENV",
  "CORE_COMMIT",
  "CORE_FILES",
  "core_urls",
  "default_cache_dir",
  "download_verified",
  "ensure_city",
  "fetch_city",
  "main",
  "sha256_file",
]

CACHE_ENV = "JAXURBAN_CACHE"
CORE_REPO = "AIMUrban/CoRE"
CORE_COMMIT = "0ec2a520d0028129586e5380baa1cf3a5e59a842"
CORE_BASE_URL = f"https://raw.githubusercontent.com/{CORE_REPO}/{CORE_COMMIT}/"

# city -> local file name -> SHA-256 of the file at CORE_COMMIT.
CORE_FILES: dict[str, dict[str, str]] = {
  "xa": {
    "regionmap_xa.geo": "79e1e4c7a41636e44c7df789ee9e4039766eec0455a083499fbf4dc406d4360e",
    "regionmap_xa.mob": "2a6cb55b12411b2e4db20d63619ec032ee95c2e3fbc26de59b3856a001426a29",
    "gdp_xa_sum.npy": "920e5673c9e7d9ee2d6a1e516a923dfabd3d626c66e8c1d76b71d684f1376ec3",
    "population_xa_sum.npy": "9bee087f89fc83e5a0f2ce5102f7fa40f367bd2250b41a109304c68c0df6fcda",
    "co2_xa_sum.npy": "8ffb9bd80b426e5c62eb26f82fa8415a643b461a72fd80e27fcae142dbbc4c91",
  },
  "cd": {
    "regionmap_cd.geo": "efe522144ad156c24951d9381309010b269fba4d53fc0b91d4afa5c5af698d32",
    "regionmap_cd.mob": "5a867bd335db0a829d6de52549ce28ba66b13ef0ed913506bcea7ff3e9b97dee",
    "gdp_cd_sum.npy": "d8fad48945b52391d474acf899e8f1e5a740c687d9752bb33c08a4dd2a7b7c62",
    "population_cd_sum.npy": "f06ac33d2342537c6bdc0223439acc3828b0bc2772b1d7eee79a7efa1c453bd0",
    "co2_cd_sum.npy": "1d0696d279e312e178b45bbccc01264b14a91a31317a2846f29a45e75a771b06",
  },
  "bj": {
    "regionmap_bj.geo": "15fdd31876368de0bd9c721882f612968a0d06fa176a3d0f9191973c529a4dc9",
    "regionmap_bj.mob": "b8f8198ce3aa5438e7b513ccb3557460bc919547ac29d85bfcaf1f26b7d42706",
    "gdp_bj_sum.npy": "978536d58bd1234f72e585af0ea18020ee049ca98216dbe9038781141e464d37",
    "population_bj_sum.npy": "9c5cfd6466bfb478b88063a2d5d1d4b7b171c2948e06ff43c78e891108b510f6",
    "co2_bj_sum.npy": "f21810ce9449c2f0565516494d9541e8eeb8804609747c59c7b5e93aa2e43626",
  },
}

_CHUNK = 1 << 20
_TIMEOUT_S = 60

Opener = Callable[..., object]


# What a failed download raises: no route, a timeout, a refused or dropped
# connection, a TLS failure mid-read (not wrapped by urlopen), or a response
# cut short (http.client.IncompleteRead).
_NETWORK_ERRORS = (
  urllib.error.URLError,
  TimeoutError,
  ConnectionError,
  ssl.SSLError,
  http.client.HTTPException,
)


def _failure_reason(error: Exception) -> str:
  """The cause in words: URLError's reason, an OSError's strerror, or a lone
  message argument (ssl's errors print their args as a tuple)."""
  for value in (getattr(error, "reason", None), getattr(error, "strerror", None)):
    if value:
      return str(value)
  if len(error.args) == 1 and isinstance(error.args[0], str) and error.args[0]:
    return error.args[0]
  return str(error) or type(error).__name__


class ChecksumMismatch(DataError):
  """A downloaded file whose SHA-256 is not the recorded one (a proxy's
  error page, say); the download was discarded."""


def _unwritable(error: OSError, folder: pathlib.Path) -> DataError:
  """An OSError that is not a network failure: the destination cannot be written."""
  # A failed rename names the temporary file first and the target second;
  # the target is the file the user knows of.
  where = getattr(error, "filename2", None) or getattr(error, "filename", None) or folder
  return DataError(
    where,
    f"cannot be written ({error.strerror or error}); choose another folder "
    f"(--dest, or ${CACHE_ENV} for the cache) or pass --data-root",
  )


def default_cache_dir() -> pathlib.Path:
  """``$JAXURBAN_CACHE`` if set, else ``~/.cache/jaxurban``."""
  env = os.environ.get(CACHE_ENV, "")
  return pathlib.Path(env).expanduser() if env else pathlib.Path("~/.cache/jaxurban").expanduser()


def _check_city(name: str) -> str:
  code = str(name).lower()
  if code not in CORE_FILES:
    raise DataError(
      f"core/{name}",
      f"unknown CoRE city {name!r}; downloadable cities: {', '.join(sorted(CORE_FILES))}",
    )
  return code


def core_urls(name: str, base_url: str = CORE_BASE_URL) -> dict[str, str]:
  """Local file name -> source URL for one city (the repository nests the CSVs one level deeper)."""
  code = _check_city(name)
  base = base_url if base_url.endswith("/") else base_url + "/"
  urls = {}
  for filename in CORE_FILES[code]:
    if filename.startswith("regionmap_"):
      urls[filename] = f"{base}raw_data/{code}/regionmap_{code}/{filename}"
    else:
      urls[filename] = f"{base}raw_data/{code}/{filename}"
  return urls


def download_verified(
  url: str, target: str | os.PathLike, sha256: str, *, opener: Opener | None = None
) -> pathlib.Path:
  """Downloads ``url`` to ``target`` only if its SHA-256 equals ``sha256``.

  The bytes go through `jaxurban.atomic.atomic_write` (a temporary file in
  the target folder, renamed into place) and the hash is checked before the
  rename, so ``target`` is never left half-written or holding unverified
  data.

  Raises:
    DataError: hash mismatch (the temporary file is deleted).
    urllib.error.URLError / OSError: the source cannot be read.
  """
  target = pathlib.Path(target)
  open_url = opener if opener is not None else urllib.request.urlopen

  def from_network(call):
    # An OSError of the connection itself (a route lost mid-read gives
    # EHOSTUNREACH, which urlopen does not wrap while reading) is a failed
    # download, not a folder that cannot be written.
    try:
      return call()
    except _NETWORK_ERRORS:
      raise
    except OSError as error:
      raise urllib.error.URLError(error.strerror or str(error)) from error

  def download_and_check(out) -> None:
    h = hashlib.sha256()
    response = from_network(lambda: open_url(url, timeout=_TIMEOUT_S))
    try:
      for chunk in iter(lambda: from_network(lambda: response.read(_CHUNK)), b""):
        h.update(chunk)
        out.write(chunk)
      # A connection closed before the announced length ends the reads as
      # an end of file would, without an error of its own.
      remaining = getattr(response, "length", None)
      if isinstance(remaining, int) and remaining > 0:
        raise http.client.IncompleteRead(b"", remaining)
    finally:
      close = getattr(response, "close", None)
      if close is not None:
        close()
    digest = h.hexdigest()
    if digest != sha256:
      # Raised inside the atomic write: its temporary file is removed and
      # `target` is left as it was.
      raise ChecksumMismatch(
        target.name,
        f"SHA-256 mismatch for {url}: got {digest}, expected {sha256}; the download was discarded",
      )

  atomic_write(target, download_and_check)
  return target


def _missing_or_stale(folder: pathlib.Path, code: str) -> list[str]:
  """File names of ``code`` that are absent from ``folder`` or fail their hash."""
  bad = []
  for filename, digest in CORE_FILES[code].items():
    path = folder / filename
    if not path.is_file() or sha256_file(path) != digest:
      bad.append(filename)
  return bad


def fetch_city(
  name: str,
  dest: str | os.PathLike | None = None,
  *,
  base_url: str = CORE_BASE_URL,
  opener: Opener | None = None,
) -> pathlib.Path:
  """Downloads one CoRE city into ``<dest>/core/<city>/`` and returns that folder.

  Files already present with the right hash are kept; anything else is
  (re)downloaded and verified.
  """
  code = _check_city(name)
  root = pathlib.Path(dest).expanduser() if dest is not None else default_cache_dir()
  folder = root / "core" / code
  if (root / "core").is_dir() and not folder.is_dir():
    # A data root's city folder spelt in capitals (every loader matches
    # city folders case-insensitively): a second, lower-case folder beside
    # it would make the city ambiguous to them.
    other = [p for p in (root / "core").iterdir() if p.is_dir() and p.name.lower() == code]
    if other:
      raise DataError(
        other[0],
        f"holds city {code!r} already, under another spelling; check it with "
        f"`--data-root {root}`, or move it away to download the city afresh",
      )
  urls = core_urls(code, base_url)
  # Every folder on the way that does not exist yet, deepest first.
  created = [p for p in (folder, *folder.parents) if not p.exists()]
  try:
    for filename in _missing_or_stale(folder, code):
      download_verified(
        urls[filename], folder / filename, CORE_FILES[code][filename], opener=opener
      )
  except BaseException:
    # A failed first download leaves no empty folders behind.
    for path in created:
      if path.is_dir() and not any(path.iterdir()):
        path.rmdir()
    raise
  return folder


def ensure_city(
  name: str,
  data_root: str | os.PathLike | None = None,
  *,
  cache_dir: str | os.PathLike | None = None,
  download: bool = True,
  opener: Opener | None = None,
) -> pathlib.Path:
  """The folder holding city ``name``, fetching it into the cache if needed.

  Looks in order at: the data root (``data_root`` or ``$JAXURBAN_DATA``, when
  set), the cache (``cache_dir``, ``$JAXURBAN_CACHE`` or
  ``~/.cache/jaxurban``), and finally downloads into the cache. A city
  folder in the data root is used as it is (either file layout), and when it
  lacks a file that file is named in the error: the cache never stands in
  for part of a folder the user pointed at. Only a city the data root does
  not hold at all is looked up in the cache, which is checked against the
  hash table. Callers should say which folder they read (``CityData.source_dir``).

  Raises:
    DataError: the data root's folder of the city is incomplete; or the city
      is nowhere and cannot be downloaded: the message says what to run, or
      which files to place where.
  """
  code = str(name).lower()
  present = None  # cities in the data root, when one is set
  # Without a data root the cache is the only place looked at: say so, since
  # a user holding the full data set has most likely forgotten to name it.
  absent = f"is not in the cache, and no data root was given (--data-root or ${DATA_ENV})"
  if data_root is not None or os.environ.get(DATA_ENV):
    root = resolve_data_root(data_root)
    folder = root / "core"
    present = []
    if not folder.is_dir():
      # Often a data root given one level too deep (…/core, …/core/xa).
      listing = ", ".join(list_subfolders(root)) or "no sub-folders"
      absent = (
        f"is not in the cache, and the data root {root} has no 'core' folder (it has: {listing})"
      )
    else:
      for entry in sorted(folder.iterdir()):
        if not entry.is_dir():
          continue
        if entry.name.lower() == code:
          city_files(entry, code)  # raises naming the missing file
          return entry
        if is_city_dir(entry):
          present.append(entry.name.lower())
      absent = (
        f"is in neither the data root ({folder} holds "
        f"{', '.join(present) if present else 'no city folder'}) nor the cache"
      )
    if code not in CORE_FILES:
      where = f"{folder} holds {', '.join(present) if present else 'no city folder'}"
      raise DataError(
        folder / str(name),
        f"unknown city {name!r}: {where}, and the downloadable cities are "
        f"{', '.join(sorted(CORE_FILES))}",
      )

  code = _check_city(name)
  cache = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
  cached = cache / "core" / code
  missing = _missing_or_stale(cached, code)
  if not missing:
    return cached
  if not download:
    raise DataError(
      cached, _manual_instructions(code, cache, missing, "downloading is switched off", absent)
    )
  return _fetch_or_explain(code, cache, opener, absent)


def _fetch_or_explain(code: str, root: pathlib.Path, opener: Opener | None, where: str):
  """`fetch_city` into ``root``; a failed download or an unwritable folder
  becomes a DataError that says what to do instead."""
  folder = root / "core" / code
  try:
    return fetch_city(code, root, opener=opener)
  except (*_NETWORK_ERRORS, ChecksumMismatch) as e:
    missing = _missing_or_stale(folder, code)
    why = (
      f"download failed ({e.problem if isinstance(e, ChecksumMismatch) else _failure_reason(e)})"
    )
    raise DataError(folder, _manual_instructions(code, root, missing, why, where)) from e
  except OSError as e:
    raise _unwritable(e, folder) from e


def _manual_instructions(
  code: str,
  root: pathlib.Path,
  missing: list[str],
  why: str,
  where: str = "is not in the data root or the cache",
) -> str:
  urls = core_urls(code)
  placement = "; ".join(f"{urls[f]} -> {root / 'core' / code / f}" for f in missing)
  # A file that is there but fails its hash (cut short, edited) is named as such.
  stale = [f for f in missing if (root / "core" / code / f).is_file()]
  if stale:
    why += f"; {', '.join(stale)} present but not matching the expected sha256"
  return (
    f"CoRE city {code!r} {where} and {why}. Either run "
    f"`python -m jaxurban.data.fetch core {code} --dest DIR` on a machine with internet "
    f"access, copy DIR to this machine and pass --data-root DIR (or set {DATA_ENV}=DIR); "
    f"or place these files by hand: {placement}"
  )


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m jaxurban.data.fetch",
    description="Download data sets with SHA-256 verification.",
  )
  sub = parser.add_subparsers(dest="dataset", required=True)
  core = sub.add_parser("core", help=f"CoRE city files from {CORE_REPO} @ {CORE_COMMIT[:12]}")
  core.add_argument(
    "cities", nargs="+", metavar="CITY", help=f"one or more of: {', '.join(CORE_FILES)}"
  )
  core.add_argument(
    "--dest",
    type=lambda text: pathlib.Path(path_argument(text)),
    default=None,
    help=f"data root to write into (default: ${CACHE_ENV} or ~/.cache/jaxurban)",
  )
  args = parser.parse_args(argv)
  root = args.dest.expanduser() if args.dest is not None else default_cache_dir()
  try:
    for city in args.cities:
      folder = _fetch_or_explain(_check_city(city), root, None, "is not complete")
      print(f"{city}: {folder}")
  except DataError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2  # as every command's data error
  return 0


if __name__ == "__main__":
  sys.exit(main())
