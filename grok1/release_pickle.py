"""The pickle encoding of the released checkpoint's arrays: a reader that runs none of numpy's pickle code,
and a writer that writes exactly what the reference wrote.

Why not numpy's own unpickling, even behind an allow-list of globals: `numpy.dtype` + BUILD calls
`dtype.__setstate__`, which rewrites a descriptor in place (a pickle can reach ml_dtypes' process-wide
bfloat16 descriptor and change its item size), or forges a structured dtype whose object fields are raw
pointers taken from the file (a segfault, or worse, as soon as the array is touched); `_reconstruct` +
`ndarray.__setstate__` builds object arrays and accepts `str` data. So `find_class` hands the pickle only
inert stand-ins:

1. `numpy.ndarray` and `ml_dtypes.bfloat16` resolve to tokens: names that can be passed along, never called.
2. `numpy.dtype(name, align, copy)` returns a `_DtypeRef` for one of `DTYPES` (int8, float32, bfloat16: all
   the release and our writer use). Its BUILD state must equal what numpy writes for that dtype; it is only
   compared, never applied.
3. `_reconstruct(ndarray, (0,), b"b")` returns an `_ArrayRef`; its BUILD state (version 1, shape, a
   `_DtypeRef`, Fortran flag, data) must carry plain `bytes` of exactly shape x itemsize, from which the array
   is copied with `np.frombuffer`. After `load`, each `_ArrayRef` is replaced by its array.

`numpy.core.multiarray.scalar` is refused: no leaf of the release is a numpy scalar.
"""

from __future__ import annotations

import math
import pickle
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

try:
    from numpy._core import multiarray as _multiarray
except ImportError:  # numpy < 2
    from numpy.core import multiarray as _multiarray

PROTOCOL = 4  # what the reference's `pickle.dump` wrote (Python 3.10 default)
MULTIARRAY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray")  # numpy 1.x and 2.x names
_MAX_DIMS = 32  # numpy's own limit is 64; the release's leaves have at most 4


class RefusedPickle(pickle.UnpicklingError):
    """The pickle asks for something a checkpoint leaf never contains."""


class _Token:
    """A global that a pickle may name (as `_reconstruct`'s class, or `dtype`'s argument) but not use."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __call__(self, *args, **kwargs):
        raise RefusedPickle(f"{self.name} may not be called")

    def __setstate__(self, state):
        raise RefusedPickle(f"{self.name} takes no state")

    def __repr__(self) -> str:
        return self.name


NDARRAY = _Token("numpy.ndarray")
BFLOAT16 = _Token("ml_dtypes.bfloat16")

# `numpy.dtype`'s first argument as the release (numpy 1.x) and numpy 2.x pickle it -> the dtype and the
# BUILD state numpy writes for it: (version, byte order, subarray, names, fields, item size, alignment, flags).
DTYPES: dict[Any, tuple[np.dtype, tuple]] = {
    "i1": (np.dtype(np.int8), (3, "|", None, None, None, -1, -1, 0)),
    "f4": (np.dtype("<f4"), (3, "<", None, None, None, -1, -1, 0)),
    BFLOAT16: (np.dtype(ml_dtypes.bfloat16), (3, "<", None, None, None, 2, 2, 64)),
}


class _DtypeRef:
    """What `numpy.dtype(...)` gives a pickle: one allowed dtype, whose state may only be restated."""

    __slots__ = ("dtype", "_state")

    def __init__(self, name, align, copy):
        if not (isinstance(name, (str, _Token)) and name in DTYPES):  # isinstance first: name may be unhashable
            raise RefusedPickle(f"dtype {name!r} is not allowed (only {', '.join(map(str, DTYPES))})")
        if align is not False or not isinstance(copy, bool):
            raise RefusedPickle(f"dtype {name!r}: unexpected arguments align={align!r}, copy={copy!r}")
        self.dtype, self._state = DTYPES[name]

    def __setstate__(self, state):
        if type(state) is not tuple or state != self._state:
            raise RefusedPickle(f"dtype {self.dtype}: state {state!r} would change it (expected {self._state})")


class _ArrayRef:
    """What `_reconstruct(...)` gives a pickle: an array to be built, once, from a validated state."""

    __slots__ = ("array",)

    def __init__(self, cls, shape, typecode):
        if cls is not NDARRAY or shape != (0,) or typecode != b"b":
            raise RefusedPickle(f"_reconstruct{(cls, shape, typecode)!r}: only a plain numpy.ndarray may be built")
        self.array = None

    def __setstate__(self, state):
        if self.array is not None:
            raise RefusedPickle("an array's state was given twice")
        if type(state) is not tuple or len(state) != 5 or state[0] != 1:
            raise RefusedPickle(f"array state must be (1, shape, dtype, fortran, data), got {_kind(state)}")
        _, shape, dtype_ref, fortran, data = state
        if (type(shape) is not tuple or len(shape) > _MAX_DIMS
                or not all(type(n) is int and n >= 0 for n in shape)):
            raise RefusedPickle(f"array shape must be a tuple of at most {_MAX_DIMS} sizes, got {shape!r}")
        if type(dtype_ref) is not _DtypeRef:
            raise RefusedPickle(f"array dtype must come from numpy.dtype, got {_kind(dtype_ref)}")
        if type(fortran) is not bool:
            raise RefusedPickle(f"array Fortran flag must be a bool, got {_kind(fortran)}")
        dtype = dtype_ref.dtype
        expected = math.prod(shape) * dtype.itemsize
        if type(data) is not bytes or len(data) != expected:
            size = f" of {len(data)} bytes" if isinstance(data, (bytes, bytearray, str)) else ""
            raise RefusedPickle(f"array data must be {expected} bytes ({dtype} {shape}), got {_kind(data)}{size}")
        # A copy: frombuffer's view of `data` would be read-only, and numpy's unpickled arrays are writeable.
        self.array = np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C").copy("C")


def _kind(value) -> str:
    return type(value).__name__


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: BinaryIO, classes: dict[tuple[str, str], type]):
        super().__init__(file)
        self._globals: dict[tuple[str, str], Any] = {("numpy", "ndarray"): NDARRAY, ("numpy", "dtype"): _DtypeRef,
                                                     ("ml_dtypes", "bfloat16"): BFLOAT16, **classes}
        for module in MULTIARRAY_MODULES:
            self._globals[(module, "_reconstruct")] = _ArrayRef

    def find_class(self, module: str, name: str):
        try:
            return self._globals[(module, name)]
        except KeyError:
            raise RefusedPickle(f"refused to load global {module}.{name} "
                                "(not an array, dtype or QuantizedWeight8bit)") from None

    def persistent_load(self, pid):
        raise RefusedPickle(f"refused persistent id {pid!r}")


def load(file: BinaryIO, classes: dict[tuple[str, str], type]) -> Any:
    """Unpickle arrays of `DTYPES` and instances of `classes` ((module, name) -> class) holding them.

    Arrays come back as plain, writeable, C-contiguous numpy arrays, also as attributes of a class instance.
    Raises `RefusedPickle` for anything else, and whatever `pickle` raises for a corrupt stream.
    """
    value = _Unpickler(file, classes).load()
    if type(value) in classes.values():
        for attr, item in vars(value).items():
            setattr(value, attr, _built(item))
    return _built(value)


def _built(value):
    if type(value) is _ArrayRef:
        if value.array is None:
            raise RefusedPickle("an array was never given its state")
        return value.array
    return value


class ReleasePickler(pickle._Pickler):
    """Pickles exactly as the reference did (numpy 1.x; the record class under a module of our choosing).

    The pure-Python pickler is used because only it lets us choose the module a global is written under:
    numpy 2 would write numpy._core (unreadable by numpy < 1.26), and our record class does not live where
    the release says it does. No module is registered in sys.modules for this.
    """

    def __init__(self, file: BinaryIO, classes: dict[type, tuple[str, str]]):
        super().__init__(file, protocol=PROTOCOL)
        self._renamed = {id(_multiarray._reconstruct): (MULTIARRAY_MODULES[0], "_reconstruct"),
                         **{id(cls): where for cls, where in classes.items()}}

    def save_global(self, obj, name=None):
        if id(obj) not in self._renamed:
            return super().save_global(obj, name)
        module_name, global_name = self._renamed[id(obj)]
        self.save(module_name)
        self.save(global_name)
        self.write(pickle.STACK_GLOBAL)
        self.memoize(obj)
