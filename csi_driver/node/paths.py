"""Node paths from requests: used exactly as given, or refused (INVALID_ARGUMENT) with the reason.

The CO names the staging and target paths; mount(8) resolves `..` and symbolic links before it mounts, so a
path that goes through either can put a volume somewhere else than the CO meant (out of the kubelet directory,
over /etc). The rules:

- absolute, without NUL and without a `..` component;
- within the kernel's limits (PATH_MAX, NAME_MAX per component), so the refusal is ours and readable rather
  than an ENAMETOOLONG from deep inside mount;
- not / and not inside /proc, /sys or /dev, the kernel's own trees;
- no existing component is a symbolic link (checked where the path is used, `refuse_symlinks`).

Repeated slashes and `.` components name the same file and are dropped: that canonical form is also how the
kernel writes mount points into /proc/self/mountinfo, so comparisons with the mount table hold.

Creating and removing targets (CSI: the SP creates target_path and deletes what it created there) is here too:
`make_*` report whether this call created the path, and only such a path is ever removed.
"""

from __future__ import annotations

import errno
import logging
import os
import stat

from .errors import CleanupFailed, InvalidPath, MountConflict, PathUnusable

log = logging.getLogger("berth.node.paths")

PATH_MAX = 4096  # bytes, including the terminating NUL
NAME_MAX = 255  # bytes per component
KERNEL_TREES = ("/proc", "/sys", "/dev")


def canonical_path(path: str, what: str) -> str:
    """The canonical form of `path`, or InvalidPath naming `what` (e.g. "target_path") and the rule it breaks."""
    if "\0" in path:
        raise InvalidPath(f"{what} {path!r} contains a NUL character")
    if not path.startswith("/"):
        raise InvalidPath(f"{what} {path!r} is not an absolute path")
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise InvalidPath(f"{what} {path!r} contains a '..' component; Berth uses paths only as given")
    canonical = "/" + "/".join(parts)
    if len(os.fsencode(canonical)) >= PATH_MAX:
        raise InvalidPath(f"{what} is {len(os.fsencode(canonical))} bytes long; the limit is {PATH_MAX - 1}")
    for part in parts:
        if len(os.fsencode(part)) > NAME_MAX:
            raise InvalidPath(f"{what} has a component of {len(os.fsencode(part))} bytes; the limit is {NAME_MAX}")
    if canonical == "/":
        raise InvalidPath(f"{what} cannot be the root directory")
    for tree in KERNEL_TREES:
        if canonical == tree or canonical.startswith(tree + "/"):
            raise InvalidPath(f"{what} {path!r} is inside {tree}, a kernel filesystem; volumes are never mounted there")
    return canonical


def refuse_symlinks(path: str, what: str) -> None:
    """InvalidPath if any existing component of the canonical `path` is a symbolic link."""
    prefix = ""
    for part in path.strip("/").split("/"):
        prefix += "/" + part
        try:
            mode = os.lstat(prefix).st_mode
        except OSError:
            return  # nothing further down exists (or can be reached), so nothing further down can be a link
        if stat.S_ISLNK(mode):
            raise InvalidPath(
                f"{what} {path!r} goes through the symbolic link {prefix!r} (to {os.readlink(prefix)!r}); "
                "Berth does not follow links in node paths, give the resolved path"
            )


def checked_path(path: str, what: str) -> str:
    """canonical_path plus refuse_symlinks: for a path Berth is about to mount on, create or remove."""
    canonical = canonical_path(path, what)
    refuse_symlinks(canonical, what)
    return canonical


def make_directory(path: str) -> bool:
    """mkdir `path` (its parents too, as the CO should have made them); True when this call created `path`
    itself, which is what makes it Berth's to remove. An existing directory is used as it is."""
    _make_parent(path)
    try:
        os.mkdir(path, 0o750)
    except FileExistsError:
        if not os.path.isdir(path):
            raise MountConflict(f"{path!r} exists and is not a directory") from None
        return False
    except OSError as err:
        raise PathUnusable(f"cannot create the directory {path!r}: {err.strerror}") from err
    return True


def make_file(path: str) -> bool:
    """Create the empty file a raw block device is bound onto; True when this call created it. An existing
    regular file is used as it is; O_NOFOLLOW because a link put there after the check must not be followed."""
    _make_parent(path)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        mode = os.lstat(path).st_mode
        if stat.S_ISDIR(mode):
            raise MountConflict(f"{path!r} is a directory; a raw block volume is published onto a file") from None
        if not stat.S_ISREG(mode):
            raise MountConflict(f"{path!r} exists and is not a regular file") from None
        return False
    except OSError as err:
        raise PathUnusable(f"cannot create the file {path!r}: {err.strerror}") from err
    os.close(fd)
    return True


def _make_parent(path: str) -> None:
    parent = os.path.dirname(path)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as err:  # also FileExistsError: a file where a directory should be
        raise PathUnusable(f"cannot create the directory {parent!r} for {path!r}: {err.strerror}") from err


def remove_created(path: str) -> None:
    """Remove the (unmounted) target Berth created, if it is still what Berth created: an empty directory or an
    empty regular file. Anything else at the path (files written into the directory, a replaced file) stays."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    try:
        if stat.S_ISDIR(st.st_mode):
            os.rmdir(path)
            return
        if stat.S_ISREG(st.st_mode) and st.st_size == 0:
            os.unlink(path)
            return
    except FileNotFoundError:
        return
    except OSError as err:
        if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise CleanupFailed(f"cannot remove {path!r}: {err.strerror}") from err
    log.warning("target left in place: it is no longer the empty file or directory Berth created", extra={"path": path})
