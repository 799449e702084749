//! Random and mutated input: never a panic, and the stream always recovers.

use super::*;

/// xorshift64*: small, seeded, good enough to shake a parser.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

const SEEDS: &[&str] = &[
    r#"{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}"#,
    r#"{"execute": "x-echo", "arguments": {"a": [1, 2.5e-3, {"b": "c\"\\\u00e9\ud83d\ude00"}], "t": true}, "id": [null]}"#,
    r#"{'execute': 'query-commands', 'id': 'x\'y'}"#,
    r#"{"exec-oob": "query-status", "id": -0}"#,
    r#"{"execute": "x-raise"}"#,
    r#"{"execute": "quit"}"#,
    r#"[[[[{"a": [[{}]]}]]]]"#,
    "\u{ff}\u{0}\t\r\n",
];

/// Interesting bytes to splice in.
const SPICE: &[u8] = b"{}[]:,\"'\\ \n\r\t\x00\x01\x7f\x80\xbf\xc0\xc3\xed\xf4\xf8\xfe\xffu0123456789.eE+-truefalsenull";

fn mutate(rng: &mut Rng, input: &mut Vec<u8>) {
    for _ in 0..=rng.below(6) {
        let at = rng.below(input.len() + 1);
        match rng.below(5) {
            0 if at < input.len() => {
                input.remove(at);
            }
            1 => input.insert(at, SPICE[rng.below(SPICE.len())]),
            2 => input.insert(at, rng.next() as u8),
            3 if at < input.len() => input[at] = SPICE[rng.below(SPICE.len())],
            _ => {
                let from = rng.below(input.len() + 1);
                let to = (from + rng.below(16)).min(input.len());
                let copy = input[from..to].to_vec();
                let at = at.min(input.len());
                input.splice(at..at, copy);
            }
        }
    }
}

fn random_bytes(rng: &mut Rng) -> Vec<u8> {
    (0..rng.below(64))
        .map(|_| {
            if rng.below(2) == 0 {
                SPICE[rng.below(SPICE.len())]
            } else {
                rng.next() as u8
            }
        })
        .collect()
}

#[test]
fn fuzz_session() {
    let limits = Limits {
        max_bytes: 1 << 12,
        max_tokens: 256,
        max_nesting: 16,
    };
    let mut rng = Rng(0x5EED_B10C_4A05_0001);
    for round in 0..600 {
        let session = Session::new(VersionInfo::new(7, 2, 0));
        let session = if round % 2 == 0 {
            session.with_limits(limits)
        } else {
            session
        };
        let mut h = Harness::with(session);
        let mut out = String::new();
        for _ in 0..20 {
            let mut input = match rng.below(3) {
                0 => random_bytes(&mut rng),
                _ => SEEDS[rng.below(SEEDS.len())].as_bytes().to_vec(),
            };
            if rng.below(4) != 0 {
                mutate(&mut rng, &mut input);
            }
            // Random chunking.
            let mut rest = &input[..];
            while !rest.is_empty() {
                let n = 1 + rng.below(rest.len());
                let (chunk, tail) = rest.split_at(n);
                out.push_str(&h.feed(chunk).1);
                rest = tail;
            }
        }
        // Every reply is a complete, valid JSON message.
        split_lines(&out);
        // Force a reset the QMP spec's way; a good request then works.
        let (_, out) = h.feed(b"\xff\n{\"execute\": \"query-status\", \"id\": \"probe\"}\n");
        let lines = split_lines(&out);
        let last = lines.last().expect("a reply");
        assert!(last.contains(r#""id": "probe""#), "round {round}: {last}");
        if h.session.is_negotiated() {
            assert!(
                last.starts_with(r#"{"return": {"status": "running""#),
                "{last}"
            );
        } else {
            assert!(
                last.contains("Expecting capabilities negotiation"),
                "{last}"
            );
        }
    }
}

#[test]
fn fuzz_from_slice() {
    let mut rng = Rng(42);
    for _ in 0..20_000 {
        let mut input = SEEDS[rng.below(SEEDS.len())].as_bytes().to_vec();
        mutate(&mut rng, &mut input);
        if let Ok(value) = json::from_slice(&input) {
            // What parses re-serialises to JSON that reads back the same
            // (up to QEMU's %.17g: 2500.0 prints as 2500, an integer).
            let text = json::to_string(&value);
            let again = json::from_slice(text.as_bytes()).map(|v| json::to_string(&v));
            assert_eq!(again.as_deref(), Ok(text.as_str()));
        }
        let _ = json::from_slice(&random_bytes(&mut rng));
    }
}
