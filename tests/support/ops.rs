//! The op vocabulary: [`Op`], one step of a random workload, decoded from
//! three random words by [`Op::decode`]; and [`Mix`], a small deterministic
//! generator (the soak and the fault tests draw op words from it, the
//! multi-threaded tests their own choices).

use cudalloc::driver::Stream;

/// Streams the model uses (0 is the legacy default stream).
pub const STREAMS: [Stream; 4] = [0, 0x10, 0x20, 0x30];

/// One step of a workload. Decoded from three random words, so the proptest
/// model runs, the soak and the fault tests share one generator (and
/// shrinking moves toward small mallocs). The fuzz targets (`fuzz/common`)
/// have their own decoder.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Op {
    Malloc {
        dev: usize,
        stream: Stream,
        size: u64,
    },
    /// Free the `pick`th live allocation (mod the live count).
    Free {
        pick: u64,
        hint_dev: usize,
        hint_stream: Stream,
    },
    /// Free a pointer freed earlier (a double free unless it is live again).
    FreeStale {
        pick: u64,
        hint_dev: usize,
    },
    /// Free a pointer inside a live block.
    FreeInterior {
        pick: u64,
        off: u64,
    },
    /// Free an arbitrary address.
    FreeGarbage {
        ptr: u64,
        hint_dev: usize,
    },
    RecordStream {
        pick: u64,
        stream: Stream,
    },
    RecordUnknown {
        ptr: u64,
        stream: Stream,
    },
    /// The GPU finishes a stream's work (late or early relative to frees).
    Complete {
        dev: usize,
        stream: Stream,
    },
    CompleteAll,
    /// A C/C++ graph capture begins on `stream` of `dev`, or ends if one
    /// runs there. Begun only on a stream holding a live allocation there:
    /// cudalloc cannot see a capture on a stream it knows nothing of (README).
    Capture {
        dev: usize,
        stream: Stream,
    },
    EmptyCache,
    EmptyCacheDevice {
        dev: usize,
    },
    ResetPeak {
        dev: usize,
    },
    SetFraction {
        dev: usize,
        fraction: f64,
    },
}

const MENU: [u64; 8] = [1, 512, 513, 1000, 4096, 65_536, 100_000, 1 << 20];

impl Op {
    /// Decode one op for a device count of `ndev` (a malloc may name device
    /// `ndev`, which is invalid).
    pub fn decode(w: [u64; 3], ndev: usize) -> Op {
        let kind = w[0] % 100;
        let dev = ((w[0] / 100) % ndev as u64) as usize;
        let stream = STREAMS[((w[0] / 1000) % 4) as usize];
        let hint_dev = ((w[2] >> 32) % (ndev as u64 + 1)) as usize;
        let hint_stream = STREAMS[((w[2] >> 40) % 4) as usize];
        match kind {
            0..=34 => Op::Malloc {
                dev,
                stream,
                size: size_from(w[1], w[2]),
            },
            35..=69 => Op::Free {
                pick: w[1],
                hint_dev,
                hint_stream,
            },
            70..=72 => Op::FreeStale {
                pick: w[1],
                hint_dev,
            },
            73..=74 => Op::FreeInterior {
                pick: w[1],
                off: w[2],
            },
            75..=76 => Op::FreeGarbage {
                ptr: garbage(w[1]),
                hint_dev,
            },
            77..=80 => Op::RecordStream {
                pick: w[1],
                stream: hint_stream,
            },
            81 => Op::RecordUnknown {
                ptr: garbage(w[1]),
                stream,
            },
            82..=89 => Op::Complete { dev, stream },
            90 => Op::CompleteAll,
            91 => Op::EmptyCache,
            92 => Op::EmptyCacheDevice { dev },
            93..=94 => Op::ResetPeak { dev },
            95..=97 => Op::SetFraction {
                dev,
                fraction: [
                    0.05,
                    0.1,
                    0.25,
                    0.5,
                    0.75,
                    1.0,
                    1.0,
                    0.0,
                    -1.0,
                    1.5,
                    f64::NAN,
                ][(w[1] % 11) as usize],
            },
            98 => Op::Capture { dev, stream },
            _ => Op::Malloc {
                dev: ndev,
                stream,
                size: size_from(w[1], w[2]),
            },
        }
    }
}

fn size_from(a: u64, b: u64) -> u64 {
    match a % 20 {
        0..=8 | 19 => MENU[((a / 20) % MENU.len() as u64) as usize],
        9..=13 => 1 + b % (1 << 20),
        14..=16 => (1 << 20) + 1 + b % (23 << 20),
        17 => (30 << 20) + b % (90 << 20),
        _ => [0, 1 << 30, 1 << 50, u64::MAX][(b % 4) as usize],
    }
}

fn garbage(a: u64) -> u64 {
    match a % 4 {
        // Near the sim's address window, 512-aligned: the likeliest to confuse.
        0 | 1 => 0x1000_0000_0000 + (a >> 8) % (1 << 36) / 512 * 512,
        2 => a | 1,
        _ => a,
    }
}

/// splitmix64: a tiny deterministic generator for soaks and stress tests.
pub struct Mix(pub u64);

impl Mix {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn words(&mut self) -> [u64; 3] {
        [self.next(), self.next(), self.next()]
    }
}
