"""Where a dataset's bytes live: chunked zarr v3 arrays and small files, at a local path or any fsspec URL.

Why zarr v3 for the pixel arrays:

- chunked along the sample axis and compressed per chunk (Blosc with LZ4 and byte shuffle, which
  suits 16-bit imagery), so a reader decodes only the chunks it touches and a writer appends chunk by
  chunk without knowing the final length;
- the native dtype is kept (uint8, uint16, int16, float16, float32), so a dataset stays near the size
  of what it samples, with the physical scaling recorded beside it;
- a maintained, versioned, language-neutral spec (zarr v3, readable from Python, Julia, Rust, JS),
  whose stores are fsspec-native: ``s3://``, ``gs://`` or a local folder are written and read by the
  same code.

Alternatives weighed: Parquet is made for columns of scalars, not (C, H, W) tensors (a list column of
bytes loses the array geometry and random access by sample); HDF5 is one file with a single writer,
poor on object stores (every read is a ranged request through a file-system shim) and not appendable
safely from a crashing process; WebDataset tars are for sequential streaming: no random access by
index, which the DataLoader's shuffling and the per-split views need. Parquet keeps the part it is
good at: the manifest.

Every chunk is digested (BLAKE3 of its decoded native bytes, shape and dtype) when written; readers
check a chunk's digest the first time they decode it, so a changed or damaged chunk is refused with
its name instead of being silently trained on.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import threading
from collections import OrderedDict, deque
from collections.abc import Sequence
from pathlib import Path

import numpy as np

# as_location and is_url are re-exported: tasks.dataset and older callers import them from here.
from tasks.storage import StorageFolder, as_location, is_url  # noqa: F401

# A chunk holds whole samples; its size is aimed at this many uncompressed bytes (see chunk_samples_for).
CHUNK_TARGET_BYTES = 16 * 2**20
MAX_CHUNK_SAMPLES = 256
CACHED_CHUNKS = 4
# Blosc settings of the stored arrays. Chunk digests are of decoded bytes, so these never change a digest.
# LZ4 with bit shuffle in 512 KiB blocks. With Sentinel-2's 20 m and 60 m bands stored at their own
# resolution (tasks.coarse_bands) a full-tile dataset is well under the scene's native size, so the codec
# is chosen for speed: against zstd level 1 (the choice while every band was stored upsampled, when size
# was tight), interleaved full-tile ingests (11 520^2 px) took 1.5 s less on average, 0.3 to 2.9 s, for a
# dataset of 0.72 instead of 0.61 times the native size. With LZ4, bit shuffle beat byte shuffle on every
# count on 16 MiB chunks of these bands: 10 m bands encoded in 13.8 against 22.9 ms, decoded in 7.6
# against 12.0 ms, 0.672 against 0.694 of their size (20 m patches: 4.3 against 9.3 ms, 0.725 against
# 0.785); interleaved full-tile ingests took 1.3 CPU s less. Readers decode any codec, shuffle and block
# size (Blosc frames say theirs).
BLOSC_CODEC = "lz4"
BLOSC_LEVEL = 1
BLOSC_SHUFFLE = "bitshuffle"
BLOSC_BLOCKSIZE = 512 * 2**10
# Chunk digests: BLAKE3 hashes 2.7x faster than SHA-256 here (4.8 against 1.8 GB/s on one core, AMD EPYC
# with AVX-512), which was a tenth of a Sentinel-2 ingest's CPU time; both are cryptographic.
CHUNK_DIGEST = "blake3"
# Threads that encode, digest and store the chunks of one batch at once (each releases the GIL).
STORE_THREADS = 2
# Batches queued for storing while the caller goes on reading (each holds a staging copy of its samples).
BATCHES_IN_FLIGHT = 2


class DatasetError(ValueError):
    """A dataset is missing, corrupt or violates an invariant (a chunk that fails its digest included)."""


def chunk_samples_for(sample_bytes: int) -> int:
    """Samples per chunk: about 16 MiB uncompressed, at most 256 samples, at least one.

    A fixed byte budget rather than a fixed sample count keeps random access cheap for large samples
    (a shuffled DataLoader decodes a whole chunk to read one sample of it: 16 MiB, not the 83 MiB of
    64 Sentinel-2 tiles of 224 px) while small samples still compress as long runs.
    """
    return int(max(1, min(MAX_CHUNK_SAMPLES, CHUNK_TARGET_BYTES // max(1, sample_bytes))))


def chunk_digest(block: np.ndarray, algorithm: str = CHUNK_DIGEST) -> str:
    """Digest of a chunk's samples (native little-endian bytes, shape and dtype), named by its algorithm.

    ``blake3`` digests read ``"blake3:<hex>"``; a bare hex digest is SHA-256, what datasets written
    before BLAKE3 record, so they still verify.
    """
    block = np.ascontiguousarray(block, dtype=block.dtype.newbyteorder("<"))
    # Hashed in place (no bytes copy); both libraries release the GIL on large buffers.
    if algorithm == "blake3":
        from blake3 import blake3

        digest = blake3(memoryview(block).cast("B"), max_threads=1)
        digest.update(f"{block.shape}{block.dtype.str}".encode())
        return f"blake3:{digest.hexdigest()}"
    if algorithm != "sha256":
        raise ValueError(f"unknown chunk digest algorithm {algorithm!r}; known: blake3, sha256")
    digest = hashlib.sha256(memoryview(block).cast("B"))
    digest.update(f"{block.shape}{block.dtype.str}".encode())
    return digest.hexdigest()


def digest_algorithm(recorded: str) -> str:
    """The algorithm of a recorded chunk digest (see :func:`chunk_digest`)."""
    return recorded.split(":", 1)[0] if ":" in recorded else "sha256"


def chunk_key(name: str, index: int, ndim: int) -> str:
    """The store key of chunk ``index`` of array ``name`` (zarr v3 default ``c/`` encoding)."""
    return "/".join([name, "c", str(index), *["0"] * (ndim - 1)])


class DatasetFiles(StorageFolder):
    """The files of one dataset, at a local folder or under an fsspec URL prefix (see :mod:`tasks.storage`)."""

    def zarr_group(self, mode: str):
        """The zarr group at the root of the location (``mode`` as in :func:`zarr.open_group`)."""
        import zarr

        read_only = mode == "r"
        if self.remote:
            store = zarr.storage.FsspecStore.from_url(self.location, read_only=read_only)
        else:
            store = zarr.storage.LocalStore(self.location, read_only=read_only)
        return zarr.open_group(store, mode=mode)


def _files_of(group) -> DatasetFiles:
    """The :class:`DatasetFiles` under a zarr group opened on a local folder (other stores must be named)."""
    import zarr

    store = group.store
    if isinstance(store, zarr.storage.LocalStore):
        return DatasetFiles(Path(store.root) / group.path if group.path else store.root)
    raise DatasetError(f"a chunk writer on a {type(store).__name__} needs the dataset's files named (files=...)")


def handed_over(block: np.ndarray, dtype: np.dtype) -> bool:
    """Whether a writer may keep ``block`` instead of a copy: read-only, owning its memory, contiguous, of ``dtype``.

    A reader that yields a fresh array per batch and never writes it again says so by making it read-only
    (``images.flags.writeable = False``); the writer then stores it without a staging copy (a copy of
    every pixel, on the thread that reads the next batch). An array that is a view, or still writeable,
    is copied: whoever holds it may change it.
    """
    return (isinstance(block, np.ndarray) and block.dtype == dtype and block.flags.c_contiguous
            and block.flags.owndata and not block.flags.writeable)


class ChunkedArrayWriter:
    """Appends samples to one zarr array a whole chunk at a time, digesting each chunk.

    Chunk boundaries depend only on the chunk size, so identical samples give identical chunks and
    digests however a reader batched them. The array's metadata is written by zarr; the chunks are
    encoded here with the array's own codec settings (Blosc, the same bytes zarr writes) and stored
    under zarr's chunk keys: zarr's write path costs about as much CPU again as the compression itself
    (its codec pipeline copies and schedules each chunk). The array's length is recorded when the
    writer closes.

    Encoding, digesting and storing run off the caller's thread, one batch at a time, the chunks of a
    batch on :data:`STORE_THREADS` threads (Blosc, hashlib and file writes release the GIL), so the
    caller reads its next batches meanwhile. Memory is one chunk buffer plus :data:`BATCHES_IN_FLIGHT`
    staged (or handed-over) batches, whatever the size of the source: :meth:`append` waits for the oldest
    batch when that many are queued.
    """

    def __init__(self, group, name: str, sample_shape: tuple[int, ...], dtype: np.dtype, chunk_samples: int,
                 files: DatasetFiles | None = None):
        from concurrent.futures import ThreadPoolExecutor

        from numcodecs import Blosc
        from zarr.codecs import BloscCodec

        self.dtype = np.dtype(dtype)
        self.sample_shape = tuple(int(s) for s in sample_shape)
        self.chunk_samples = chunk_samples
        self.name = name
        shuffle = BLOSC_SHUFFLE if self.dtype.itemsize > 1 else "noshuffle"
        self.array = group.create_array(
            name, shape=(0, *self.sample_shape), chunks=(chunk_samples, *self.sample_shape), dtype=self.dtype,
            compressors=[BloscCodec(cname=BLOSC_CODEC, clevel=BLOSC_LEVEL, shuffle=shuffle, blocksize=BLOSC_BLOCKSIZE)],
            fill_value=0)
        self.files = files if files is not None else _files_of(group)
        # The array's stored dtype is little-endian (zarr's bytes codec); Blosc's typesize is the item size.
        self._stored_dtype = self.dtype.newbyteorder("<")
        self._codec = Blosc(cname=BLOSC_CODEC, clevel=BLOSC_LEVEL, shuffle={"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}[shuffle],
                            blocksize=BLOSC_BLOCKSIZE, typesize=self.dtype.itemsize)
        self.buffer = np.empty((chunk_samples, *self.sample_shape), dtype=self.dtype)
        self.filled = 0
        self.length = 0
        self.digests: list[str] = []
        # Staging buffers of the batches in flight, reused batch after batch: a fresh batch-sized array
        # would cost page faults on every batch.
        self._free: list[np.ndarray] = []
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"vitrail-write-{name}")
        self._chunk_pool = ThreadPoolExecutor(max_workers=STORE_THREADS, thread_name_prefix=f"vitrail-chunk-{name}")
        self._pending: deque = deque()
        # Local chunk files written so far (and whether already synced), made durable when the writer closes.
        self._written: list[tuple[str, bool]] = []
        self._written_lock = threading.Lock()
        self._direct = hasattr(os, "O_DIRECT")

    def append(self, block: np.ndarray) -> None:
        """Queue ``block`` (N, *sample_shape) for storing; raises what storing an earlier batch raised.

        Up to :data:`BATCHES_IN_FLIGHT` batches wait or are being stored while the caller goes on (reading
        its next strip while the last one's batches are compressed); the next append waits for the oldest.
        ``block`` is copied first, since the caller may reuse or change its array once this returns, unless
        the caller handed it over: a read-only array of the stored dtype that owns its memory (see
        :func:`handed_over`) is stored as it is.
        """
        while len(self._pending) >= BATCHES_IN_FLIGHT:
            self._wait_oldest()
        if handed_over(block, self.dtype):
            self._pending.append((self._worker.submit(self._append_now, block), None))
            return
        buffer = next((b for b in self._free if len(b) >= len(block)), None)
        if buffer is None:
            buffer = np.empty((len(block), *self.sample_shape), dtype=self.dtype)
        else:
            self._free.remove(buffer)
        staging = buffer[:len(block)]
        staging[...] = block
        self._pending.append((self._worker.submit(self._append_now, staging), buffer))

    def _wait_oldest(self) -> None:
        job, buffer = self._pending.popleft()
        try:
            job.result()
        finally:
            if buffer is not None:
                self._free.append(buffer)

    def wait(self) -> None:
        """Block until every batch in flight is stored; raise what storing one raised."""
        while self._pending:
            self._wait_oldest()

    def close(self) -> None:
        """Store everything queued and the last, partly filled chunk, record the array's length; stop the threads."""
        try:
            self.wait()
            if self.filled:
                self._store_chunk(self.buffer[:self.filled])
                self.filled = 0
            self._make_durable()
            self.array.resize((self.length, *self.sample_shape))
        finally:
            self._worker.shutdown(wait=True)
            self._chunk_pool.shutdown(wait=True)

    def abandon(self) -> None:
        """Stop without storing more (after a failed write): wait for the batch in flight, drop the rest."""
        try:
            self.wait()
        except Exception:  # noqa: BLE001 - the write already failed; its own error is the one reported
            pass
        self._worker.shutdown(wait=True, cancel_futures=True)
        self._chunk_pool.shutdown(wait=True, cancel_futures=True)

    def _append_now(self, block: np.ndarray) -> None:
        position = 0
        if self.filled:  # complete the chunk begun by an earlier batch
            take = min(self.chunk_samples - self.filled, len(block))
            self.buffer[self.filled:self.filled + take] = block[:take]
            self.filled += take
            position = take
            if self.filled == self.chunk_samples:
                self._store_chunk(self.buffer)
                self.filled = 0
        # Every whole chunk left in the batch is stored straight from the batch, its chunks concurrently.
        whole = (len(block) - position) // self.chunk_samples * self.chunk_samples
        if whole:
            self._store_chunk(block[position:position + whole])
            position += whole
        rest = len(block) - position
        if rest:
            self.buffer[:rest] = block[position:]
            self.filled = rest

    def _store_chunk(self, block: np.ndarray) -> None:
        """Store ``block`` at the end of the array: one or more whole chunks, the last one possibly partial."""
        first = self.length // self.chunk_samples
        parts = [block[offset:offset + self.chunk_samples] for offset in range(0, len(block), self.chunk_samples)]
        jobs = [self._chunk_pool.submit(self._store_one, first + i, part) for i, part in enumerate(parts)]
        digests = [job.result() for job in jobs]  # in chunk order, and the first error raised
        self.digests.extend(digests)
        self.length += len(block)

    def _store_one(self, index: int, samples: np.ndarray) -> str:
        """Encode, digest and write chunk ``index``; returns its digest (of the samples it holds)."""
        samples = np.ascontiguousarray(samples, dtype=self._stored_dtype)
        if len(samples) < self.chunk_samples:
            # zarr stores an edge chunk at the full chunk shape, the rows past the array's end at fill value 0.
            padded = np.zeros((self.chunk_samples, *self.sample_shape), dtype=self._stored_dtype)
            padded[:len(samples)] = samples
            encoded = self._codec.encode(padded)
        else:
            encoded = self._codec.encode(samples)
        digest = chunk_digest(samples)
        self._write_chunk(chunk_key(self.name, index, 1 + len(self.sample_shape)), encoded)
        return digest

    def _write_chunk(self, key: str, encoded: bytes) -> None:
        """Write one encoded chunk: on an object store a whole put; locally a plain file, flushed at close.

        A writer fills a location nobody reads yet (a dataset's partial folder, renamed into place once
        complete; a part, finished by its ``part.json``), so a chunk file needs no temporary name of its
        own. Where the file system takes it, a chunk goes to disk with direct I/O and is synced at once (see
        :func:`_write_direct`). Otherwise it is written through the page cache and not flushed each: a
        flush per buffered chunk kept the chunk threads waiting on the disk for most of an ingest's time;
        :meth:`close` flushes them all at the end, before the metadata that publishes them is written, and
        writeback of each file is started at once (``POSIX_FADV_DONTNEED`` starts it without waiting), so
        little is left to wait for then.
        """
        if self.files.remote:
            self.files.write_bytes(key, encoded)
            return
        path = os.path.join(self.files.location, key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if self._direct and _write_direct(path, encoded):
            synced = True
        else:
            self._direct = synced = False  # the file system refused direct I/O: buffered writes from now on
            with open(path, "wb") as handle:
                handle.write(encoded)
                handle.flush()
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        with self._written_lock:
            self._written.append((path, synced))

    def _make_durable(self) -> None:
        """fsync every chunk file written locally not synced yet, and the folders holding them, on the chunk threads."""
        with self._written_lock:
            written, self._written = self._written, []
        if not written:
            return
        root = os.path.join(self.files.location, self.name)
        folders = {root}
        files = [path for path, synced in written if not synced]
        for path, _ in written:
            folder = os.path.dirname(path)
            while folder.startswith(root) and folder not in folders:
                folders.add(folder)
                folder = os.path.dirname(folder)
        list(self._chunk_pool.map(_fsync, [*files, *sorted(folders, key=len, reverse=True)]))


# Direct I/O wants buffers, lengths and offsets in multiples of the device's logical block (512 B or 4 KiB).
DIRECT_ALIGNMENT = 4096


class _DirectBuffer(threading.local):
    """A page-aligned buffer per writing thread (an anonymous mmap), grown as chunks need, kept between chunks."""

    def __init__(self) -> None:
        self.buffer: mmap.mmap | None = None

    def get(self, size: int) -> mmap.mmap:
        if self.buffer is None or len(self.buffer) < size:
            if self.buffer is not None:
                self.buffer.close()
            # A MiB to spare: encoded chunks vary by a few KiB, and each new mapping is faulted in afresh.
            self.buffer = mmap.mmap(-1, (size // 2**20 + 2) * 2**20)
        return self.buffer


_DIRECT_BUFFER = _DirectBuffer()


def _write_direct(path: str, encoded: bytes) -> bool:
    """Write ``encoded`` as the file ``path`` with ``O_DIRECT``; False (nothing left behind) where refused.

    A buffered write copies every byte into the page cache in the kernel and leaves it to be written back
    and evicted: for the 1.9 GB of an 11 520^2 px Sentinel-2 dataset that copy alone took 2 to 4 CPU
    seconds here, a sixth of the ingest's CPU time, against 0.25 s direct. The encoded bytes are copied
    into an aligned buffer, written in whole blocks, and the file cut back to its length.
    """
    size = -(-len(encoded) // DIRECT_ALIGNMENT) * DIRECT_ALIGNMENT
    buffer = _DIRECT_BUFFER.get(size)
    buffer[:len(encoded)] = encoded
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o666)
    except OSError as error:
        if error.errno == errno.EINVAL:  # tmpfs and some other file systems refuse O_DIRECT
            return False
        raise
    try:
        view = memoryview(buffer)[:size]
        done = 0
        while done < size:
            written = os.pwrite(descriptor, view[done:], done)
            if written <= 0:
                raise OSError(errno.EIO, f"{path}: direct write made no progress")
            done += written
        os.ftruncate(descriptor, len(encoded))
        # Synced here, on the chunk thread, while the ingest goes on: the data is on the device already, so
        # this only commits the file's length, and a few hundred such commits left to close() took a
        # twentieth of a full-tile ingest's time at its end.
        os.fdatasync(descriptor)
    except OSError as error:
        os.close(descriptor)
        if error.errno != errno.EINVAL:
            raise
        os.unlink(path)
        return False
    finally:
        view.release()
    os.close(descriptor)
    return True


def _fsync(path: str) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    except OSError:  # a folder some file systems cannot sync; the file data is what matters
        if not os.path.isdir(path):
            raise
    finally:
        os.close(descriptor)


class CachedChunks:
    """Chunks of samples decoded on demand, the last :data:`CACHED_CHUNKS` kept (least recently used goes first).

    Subclasses decode (``_decode``); this keeps the cache, shared by every split that reads the samples,
    and pickles into DataLoader worker processes without it (each process keeps its own).
    """

    _process_local: tuple[str, ...] = ("_cache", "_lock")

    def _init_cache(self) -> None:
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for key in self._process_local:
            state.pop(key)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_cache()

    def is_cached(self, index: int) -> bool:
        """Whether chunk ``index`` is decoded already (reading it now costs no decode)."""
        with self._lock:
            return index in self._cache

    def chunk(self, index: int) -> np.ndarray:
        """Samples of chunk ``index`` in their stored dtype."""
        with self._lock:
            cached = self._cache.get(index)
            if cached is not None:
                self._cache.move_to_end(index)
                return cached
        block = self._decode(index)
        with self._lock:
            self._cache[index] = block
            while len(self._cache) > CACHED_CHUNKS:
                self._cache.popitem(last=False)
        return block

    def _decode(self, index: int) -> np.ndarray:
        raise NotImplementedError


class ChunkSource(CachedChunks):
    """Decoded chunks of one stored array, each verified against its digest on first decode.

    Keeps the last few decoded chunks (an LRU of ``CACHED_CHUNKS``), shared by every split that views
    the array. Safe to pickle into DataLoader worker processes (the cache is not carried).
    """

    def __init__(self, files: DatasetFiles, array, name: str, digests: Sequence[str], verify: bool = True):
        self.files = files
        self.array = array
        self.name = name
        self.digests = list(digests)
        self.verify = verify
        self.chunk_samples = int(array.chunks[0])
        self._init_cache()

    _process_local = (*CachedChunks._process_local, "_verified")

    def _init_cache(self) -> None:
        super()._init_cache()
        self._verified: set[int] = set()

    @property
    def num_chunks(self) -> int:
        return len(self.digests)

    def key(self, index: int) -> str:
        return chunk_key(self.name, index, self.array.ndim)

    def _decode(self, index: int) -> np.ndarray:
        if not 0 <= index < self.num_chunks:
            raise IndexError(f"chunk {index} of {self.name} out of range ({self.num_chunks} chunks)")
        start = index * self.chunk_samples
        stop = min(start + self.chunk_samples, int(self.array.shape[0]))
        try:
            block = np.asarray(self.array[start:stop])
        except Exception as error:  # any codec failure on damaged bytes: name the chunk, not the codec
            raise DatasetError(f"{self.files.describe(self.key(index))}: chunk could not be decoded "
                             f"({type(error).__name__}: {error})") from error
        if self.verify and index not in self._verified:
            self.check(index, block)
            self._verified.add(index)
        return block

    def check(self, index: int, block: np.ndarray) -> None:
        """Raise DatasetError naming the chunk unless ``block`` matches its recorded digest."""
        recorded = self.digests[index]
        if chunk_digest(block, digest_algorithm(recorded)) == recorded:
            return
        key = self.key(index)
        problem = "is missing" if not self.files.exists(key) else "does not match its digest (changed or corrupt)"
        raise DatasetError(f"{self.files.describe(key)}: chunk {index} of {self.name} {problem}")

    def verify_all(self) -> int:
        """Decode and check every chunk once (without caching); returns the number of chunks."""
        for index in range(self.num_chunks):
            start = index * self.chunk_samples
            stop = min(start + self.chunk_samples, int(self.array.shape[0]))
            try:
                block = np.asarray(self.array[start:stop])
            except Exception as error:
                raise DatasetError(f"{self.files.describe(self.key(index))}: chunk could not be decoded "
                                 f"({type(error).__name__}: {error})") from error
            self.check(index, block)
        return self.num_chunks


class LazySamples:
    """The samples of one split, read from a :class:`ChunkSource` on demand.

    Looks enough like a NumPy array for callers that index it: ``len()``, ``shape``, ``dtype``,
    ``ndim`` and ``x[i]``, ``x[a:b]``, ``x[[i, j, ...]]`` (boolean masks too), which return NumPy
    arrays. Images come back as float32 physical values (``raw * scale + offset`` per channel, the
    same arithmetic as :meth:`domains.SampleSet.physical`); label arrays as int64.

    Efficient access patterns: reading in index order, or in slices, decodes each chunk once (the
    recent chunks stay cached); a torch DataLoader that shuffles samples globally decodes about one
    chunk (about 16 MiB) per sample, which is correct but slower: :meth:`chunk_shuffled_order`
    (chunks in random order, samples shuffled within a window of a few chunks) keeps every decode reused. ``np.asarray(x)`` reads the whole
    split: use it only for small data.
    """

    def __init__(self, source: ChunkSource, members: np.ndarray, scaling: Sequence[Sequence[float]] | None,
                 dtype: np.dtype):
        self.source = source
        self.members = np.asarray(members, dtype=np.int64)
        self.dtype = np.dtype(dtype)
        self.shape = (len(self.members), *(int(s) for s in source.array.shape[1:]))
        self.ndim = len(self.shape)
        self._scale = self._offset = None
        if scaling is not None:
            shape = (1, -1) + (1,) * (self.ndim - 2)
            self._scale = np.array([s for s, _ in scaling], dtype=np.float32).reshape(shape)
            self._offset = np.array([o for _, o in scaling], dtype=np.float32).reshape(shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"LazySamples(shape={self.shape}, dtype={self.dtype}, array={self.source.name!r})"

    def _convert(self, raw: np.ndarray) -> np.ndarray:
        if self._scale is not None:
            return raw.astype(np.float32) * self._scale + self._offset
        return raw.astype(self.dtype, copy=False)

    def _positions(self, key) -> np.ndarray:
        if isinstance(key, slice):
            return np.arange(len(self))[key]
        positions = np.asarray(key)
        if positions.dtype == bool:
            if positions.shape != (len(self),):
                raise IndexError(f"boolean index of shape {positions.shape} for {len(self)} samples")
            return np.flatnonzero(positions)
        if not np.issubdtype(positions.dtype, np.integer):
            raise IndexError(f"samples are indexed by int, slice or integer array, not {positions.dtype}")
        if positions.size and (positions.min() < -len(self) or positions.max() >= len(self)):
            raise IndexError(f"sample index out of range for {len(self)} samples")
        return np.where(positions < 0, positions + len(self), positions)

    def __getitem__(self, key):
        if isinstance(key, tuple):
            return self[key[0]][(slice(None), *key[1:]) if not isinstance(key[0], (int, np.integer)) else key[1:]]
        if isinstance(key, (int, np.integer)):
            if not -len(self) <= key < len(self):
                raise IndexError(f"sample {key} out of range for {len(self)} samples")
            index = int(self.members[key])
            size = self.source.chunk_samples
            return self._convert(self.source.chunk(index // size)[index % size][None])[0]
        return self.take(self._positions(key))

    def take(self, positions: np.ndarray) -> np.ndarray:
        """Samples at ``positions`` of the split (in that order), reading each chunk they need once."""
        wanted = self.members[positions]
        out = np.empty((len(wanted), *self.shape[1:]), dtype=self.dtype)
        size = self.source.chunk_samples
        chunks = wanted // size
        # Chunks already decoded first: decoding a new one evicts the least recently used, which must not be
        # one this read (or the reads of the same few chunks after it) still needs.
        for chunk in sorted(np.unique(chunks).tolist(), key=lambda c: not self.source.is_cached(c)):
            rows = np.flatnonzero(chunks == chunk)
            out[rows] = self._convert(self.source.chunk(int(chunk))[wanted[rows] - chunk * size])
        return out

    def chunk_shuffled_order(self, rng: np.random.Generator, window_chunks: int = CACHED_CHUNKS) -> np.ndarray:
        """A random order of the split's positions in which each chunk is decoded about once.

        Chunks come in random order, and the samples of each window of ``window_chunks`` chunks (no
        more than the decoded-chunk cache holds) are shuffled together: a sampler for a DataLoader
        over a large split, nearly as random as a global shuffle at a fraction of the decoding.
        """
        chunks = self.members // self.source.chunk_samples
        order = rng.permutation(np.unique(chunks))
        windows = [order[i:i + window_chunks] for i in range(0, len(order), max(1, window_chunks))]
        return np.concatenate([rng.permutation(np.flatnonzero(np.isin(chunks, window))) for window in windows]
                              or [np.zeros(0, dtype=np.int64)])

    def batches(self, batch_size: int):
        """Consecutive ``(start, samples)`` blocks of at most ``batch_size`` samples, in order."""
        for start in range(0, len(self), batch_size):
            yield start, self[start:start + batch_size]

    def __iter__(self):
        for _, block in self.batches(max(1, self.source.chunk_samples)):
            yield from block

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self[:]
        return whole if dtype is None else whole.astype(dtype)
