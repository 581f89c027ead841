"""Deterministic MP3 synthesis for the sandbox's ``audio_url`` downloads.

Sits behind ``GET /_sandbox/audio/{clip_id}.mp3``: ``state.py`` plans each
clip when its task is created (the length must be known for the poll body's
``duration``) and :class:`AudioCache` renders and encodes it on first
download. The music is a short melody: the prompt text picks key, scale and
tempo (the same prompt sounds alike), the clip's seed picks the notes.
Mono, 22.05 kHz, 32 kbit/s CBR: a few seconds cost about 20 KB.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from collections import OrderedDict
from dataclasses import dataclass

import lameenc
import numpy as np

SAMPLE_RATE = 22_050
BIT_RATE_KBPS = 32
# An MPEG-2 layer III frame at 22.05 kHz holds 576 samples. LAME adds two
# frames of encoder delay and padding to a whole number of frames, and a CBR
# file without a Xing header is timed by decoders (mutagen included) from its
# frame count, so the advertised duration counts those frames too.
FRAME_SAMPLES = 576
_PADDING_FRAMES = 2
MIN_FRAMES = 100  # about 2.6 s
MAX_FRAMES = 175  # about 4.6 s; encoding costs about 1.5 ms per second of audio

_SCALES = (
    (0, 2, 4, 7, 9),  # major pentatonic
    (0, 3, 5, 7, 10),  # minor pentatonic
    (0, 2, 4, 5, 7, 9, 11),  # major
    (0, 2, 3, 5, 7, 8, 10),  # natural minor
)


@dataclass(frozen=True)
class ClipPlan:
    """Everything needed to render one clip, fixed when its task is created."""

    prompt: str
    seed: bytes
    frames: int

    @property
    def duration(self) -> float:
        """Seconds, as a decoder reports them for the encoded file."""
        return (self.frames + _PADDING_FRAMES) * FRAME_SAMPLES / SAMPLE_RATE


def plan_clip(prompt: str, seed: bytes) -> ClipPlan:
    """Choose a clip's length from its seed; rendering happens later, on download."""
    span = MAX_FRAMES - MIN_FRAMES + 1
    frames = MIN_FRAMES + int.from_bytes(hashlib.sha256(seed).digest()[:4], "big") % span
    return ClipPlan(prompt=prompt, seed=seed, frames=frames)


def render(plan: ClipPlan) -> np.ndarray:
    """The clip as 16-bit mono PCM samples."""
    style = hashlib.sha256(plan.prompt.encode("utf-8")).digest()
    rng = np.random.default_rng(list(hashlib.sha256(plan.seed + style).digest()))
    scale = np.array(_SCALES[style[0] % len(_SCALES)])
    root = 48 + style[1] % 12  # MIDI note C3..B3
    beat = 60.0 / (78 + style[2] % 60)  # 78..137 bpm
    step = int(SAMPLE_RATE * beat / 2)  # eighth notes

    total = plan.frames * FRAME_SAMPLES
    notes = -(-total // step)
    # A random walk over two octaves of the scale keeps the melody stepwise, like a tune.
    walk = np.cumsum(rng.integers(-2, 3, notes)) + int(rng.integers(len(scale)))
    degrees = np.abs((walk + 2 * len(scale)) % (4 * len(scale)) - 2 * len(scale))
    degrees = np.minimum(degrees, 2 * len(scale) - 1)
    octave, index = np.divmod(degrees, len(scale))
    melody = root + 12 + 12 * octave + scale[index]

    # float32 throughout: a download that first renders a clip waits for this, and
    # numpy's float32 sin/exp are many times faster than float64's. (Python float
    # scalars do not promote float32 arrays in numpy 2.)
    samples = np.arange(total, dtype=np.int32)
    note_of = samples // step
    beats_into_note = (samples % step).astype(np.float32) / (SAMPLE_RATE * beat)
    beats_into_bar = (samples % (4 * step)).astype(np.float32) / (SAMPLE_RATE * beat)
    melody_tone = _tone(_frequency(melody)[note_of])
    bass_tone = _tone(np.full(total, _frequency(root)))
    out = 0.35 * np.exp(-4.0 * beats_into_note) * melody_tone
    out += 0.25 * np.exp(-1.5 * beats_into_bar) * bass_tone

    fade = min(total // 2, SAMPLE_RATE // 20)
    ramp = np.linspace(0.0, 1.0, fade, dtype=np.float32)
    out[:fade] *= ramp
    out[total - fade :] *= ramp[::-1]
    pcm: np.ndarray = np.clip(out * 32767.0, -32768, 32767).astype(np.int16)
    return pcm


def _frequency(midi_note: np.ndarray | int) -> np.ndarray:
    frequency: np.ndarray = 440.0 * 2.0 ** ((np.asarray(midi_note) - 69) / 12)
    return frequency


def _tone(frequency: np.ndarray) -> np.ndarray:
    """A sample-by-sample frequency as a tone with two overtones (phase kept continuous)."""
    cycles = np.cumsum(frequency) / SAMPLE_RATE
    phase = 2.0 * np.pi * (cycles - np.floor(cycles))  # reduced: float32 keeps its precision
    # One sin/cos pair, with multiple-angle identities for the overtones.
    first = np.sin(phase.astype(np.float32))
    cosine = np.cos(phase.astype(np.float32))
    second = 2.0 * first * cosine
    third = first * (3.0 - 4.0 * first * first)  # not first**3: numpy's float32 pow is slow
    tone: np.ndarray = first + 0.3 * second + 0.1 * third
    return tone


def encode(pcm: np.ndarray) -> bytes:
    """MP3-encode 16-bit mono PCM at :data:`SAMPLE_RATE`."""
    encoder = lameenc.Encoder()
    encoder.set_bit_rate(BIT_RATE_KBPS)
    encoder.set_in_sample_rate(SAMPLE_RATE)
    encoder.set_channels(1)
    encoder.set_quality(7)  # fast; the sound only has to be real, not good
    return bytes(encoder.encode(pcm.tobytes())) + bytes(encoder.flush())


class AudioCache:
    """Encoded clips by clip id, least recently used evicted.

    Encoding costs a few milliseconds per clip and clients download each clip
    about once, so a modest bound keeps memory flat during long runs while
    repeat downloads (retries, drift restores) stay cheap.
    """

    def __init__(self, capacity: int = 512) -> None:
        self._capacity = capacity
        self._items: OrderedDict[str, bytes] = OrderedDict()

    def get(self, clip_id: str, plan: ClipPlan) -> bytes:
        """The MP3 bytes of a clip, rendering and encoding them on a miss."""
        data = self._items.get(clip_id)
        if data is None:
            data = encode(render(plan))
            self._items[clip_id] = data
            if len(self._items) > self._capacity:
                self._items.popitem(last=False)
        else:
            self._items.move_to_end(clip_id)
        return data

    def clear(self) -> None:
        self._items.clear()


#: Side of the square cover images, in pixels: enough to see, a few hundred bytes.
COVER_SIZE = 16


def cover_png(clip_id: str) -> bytes:
    """A small PNG for a clip's ``image_url``, the same for the same clip id.

    Two colours from a hash of the id, in a diagonal gradient, so covers
    differ from clip to clip (a client that mixes them up shows it).
    """
    digest = hashlib.sha256(clip_id.encode()).digest()
    a, b = digest[:3], digest[3:6]
    rows = bytearray()
    for y in range(COVER_SIZE):
        rows.append(0)  # filter type: none
        for x in range(COVER_SIZE):
            t = (x + y) / (2 * (COVER_SIZE - 1))
            rows.extend(round(a[i] + (b[i] - a[i]) * t) for i in range(3))

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", COVER_SIZE, COVER_SIZE, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(bytes(rows), 9))
        + chunk(b"IEND", b"")
    )
