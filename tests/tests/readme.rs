//! The README's shell commands work as printed.
//!
//! A command is a line of a ```sh block (its trailing `# comment` removed), a command a
//! comment starts with (`# calwatch-gateway check --config FILE: …`, up to the colon), or
//! an inline code span whose first word is a program below and which has arguments.
//! `demo ARGS` is the gateway's demo (`cargo run -- demo` runs it). Each is checked against
//! the real program:
//!
//! - `calwatch-agent`, `calwatch-gateway`: the subcommand exists in the built binary and its
//!   `--help` names every flag used; arguments that are paths into the repository exist.
//! - `cargo`: its flags in `cargo SUBCOMMAND --help`; what follows `--` as above, for the
//!   binary `cargo run` runs (the workspace's `default-members`, or `-p`/`--bin`).
//! - `tests/run`: every flag in `tests/run --help`.
//! - `mbpoll`: every flag known to this test and in `mbpoll -h`; then it runs as printed
//!   (the port substituted) against the `calwatch-agent simulate` command printed before it,
//!   and every value it prints must be a value of that profile, of the type and word order
//!   mbpoll was told, and equal what calwatch's decoder reads through tokio-modbus.
//! - `sqlite3`: the backup command runs as printed, in a directory holding a registry made
//!   by `calwatch-gateway import`; the copy must dump the same as the original.
//!
//! A span of bare flags (`--speed`, `--influx-url URL`, `-B`) must name flags of a program
//! its section prints. A ```sh line of any other program fails: teach this test to check it.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use calwatch_agent::profile::{Decoded, Profile, Table, ValueType, WordOrder};
use calwatch_tests::{bin, free_port, run_to_end, run_to_end_within, tool, workspace, Proc};
use tokio_modbus::client::{tcp, Reader};
use tokio_modbus::Slave;

/// The programs whose commands this test recognises in prose and knows how to check.
const PROGRAMS: &[&str] = &[
    "calwatch-agent",
    "calwatch-gateway",
    "demo",
    "cargo",
    "tests/run",
    "mbpoll",
    "sqlite3",
];

/// One command the README prints.
#[derive(Clone, Debug)]
struct Cmd {
    /// README line it starts on (1-based).
    line: usize,
    section: String,
    /// As printed (a span's line breaks as spaces).
    text: String,
    words: Vec<String>,
}

impl Cmd {
    fn program(&self) -> &str {
        &self.words[0]
    }

    fn args(&self) -> &[String] {
        &self.words[1..]
    }

    /// The value after `flag`, if the command has one.
    fn value_of(&self, flag: &str) -> Option<&str> {
        let at = self.words.iter().position(|w| w == flag)?;
        self.words.get(at + 1).map(String::as_str)
    }
}

impl fmt::Display for Cmd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "README.md:{}: `{}`", self.line, self.words.join(" "))
    }
}

/// A span of bare flags, e.g. `--influx-url URL --influx-db calwatch`.
#[derive(Debug)]
struct BareFlags {
    line: usize,
    section: String,
    flags: Vec<String>,
}

#[derive(Debug, Default)]
struct Readme {
    commands: Vec<Cmd>,
    bare_flags: Vec<BareFlags>,
}

fn readme_text() -> String {
    std::fs::read_to_string(workspace().join("README.md")).unwrap()
}

/// Splits shell words: whitespace outside quotes, quotes removed; the brackets of optional
/// parts (`[--count N]`) dropped.
fn shell_words(text: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quote: Option<char> = None;
    let mut in_word = false;
    for c in text.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => word.push(c),
            (None, '"' | '\'') => {
                quote = Some(c);
                in_word = true;
            }
            (None, c) if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            (None, c) => {
                word.push(c);
                in_word = true;
            }
        }
    }
    assert!(quote.is_none(), "unbalanced quote in {text:?}");
    if in_word {
        words.push(word);
    }
    words
        .into_iter()
        .map(|w| {
            if w.starts_with('[') || w.ends_with(']') {
                w.trim_matches(|c| c == '[' || c == ']').to_string()
            } else {
                w
            }
        })
        .filter(|w| !w.is_empty())
        .collect()
}

fn is_flag(word: &str) -> bool {
    let mut chars = word.chars();
    chars.next() == Some('-')
        && chars
            .next()
            .is_some_and(|c| c == '-' || c.is_ascii_alphanumeric())
}

/// `calwatch-gateway check --config FILE: validate and exit` → the words up to the colon.
fn command_in_comment(comment: &str) -> Option<Vec<String>> {
    let words = shell_words(comment);
    if !PROGRAMS.contains(&words.first()?.as_str()) {
        return None;
    }
    let mut out = Vec::new();
    for w in words {
        if let Some(last) = w.strip_suffix([':', ';', ',']) {
            out.push(last.to_string());
            break;
        }
        out.push(w);
    }
    Some(out)
}

/// A sh-block line: (command, trailing comment). `#` starts a comment at the line's start or
/// after whitespace, outside quotes.
fn split_comment(line: &str) -> (&str, Option<&str>) {
    let mut quote: Option<char> = None;
    let mut prev = ' ';
    for (i, c) in line.char_indices() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '"' || c == '\'' => quote = Some(c),
            None if c == '#' && prev.is_whitespace() => return (&line[..i], Some(&line[i + 1..])),
            None => {}
        }
        prev = c;
    }
    (line, None)
}

/// The inline code spans of a paragraph (its lines from README line `first` on).
fn paragraph(lines: &mut Vec<(usize, &str)>, section: &str, readme: &mut Readme) {
    let Some(&(first, _)) = lines.first() else {
        return;
    };
    let joined: String = lines.iter().map(|(_, l)| format!("{l}\n")).collect();
    lines.clear();
    assert!(
        joined.matches('`').count() % 2 == 0,
        "README.md:{first}: a paragraph with an odd number of backticks"
    );
    let mut line = first;
    for (i, part) in joined.split('`').enumerate() {
        if i % 2 == 1 {
            let text = part.replace('\n', " ");
            let words = shell_words(&text);
            match words.first().map(String::as_str) {
                Some(p) if PROGRAMS.contains(&p) && words.len() > 1 => readme.commands.push(Cmd {
                    line,
                    section: section.to_string(),
                    text: text.trim().to_string(),
                    words,
                }),
                Some(w) if is_flag(w) => readme.bare_flags.push(BareFlags {
                    line,
                    section: section.to_string(),
                    flags: words.into_iter().filter(|w| is_flag(w)).collect(),
                }),
                _ => {}
            }
        }
        line += part.matches('\n').count();
    }
}

fn parse(text: &str) -> Readme {
    let mut readme = Readme::default();
    let mut section = String::new();
    let mut fence: Option<String> = None;
    let mut para: Vec<(usize, &str)> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if let Some(lang) = line.trim_start().strip_prefix("```") {
            paragraph(&mut para, &section, &mut readme);
            fence = match fence {
                Some(_) => None,
                None => Some(lang.trim().to_string()),
            };
            continue;
        }
        match fence.as_deref() {
            Some("sh" | "bash" | "shell") => {
                let (code, comment) = split_comment(line);
                let words = shell_words(code);
                if !words.is_empty() {
                    readme.commands.push(Cmd {
                        line: n,
                        section: section.clone(),
                        text: code.trim().to_string(),
                        words,
                    });
                }
                if let Some(words) = comment.and_then(command_in_comment) {
                    readme.commands.push(Cmd {
                        line: n,
                        section: section.clone(),
                        text: words.join(" "),
                        words,
                    });
                }
            }
            Some(_) => {} // other blocks (text, diagrams) print no commands
            None if line.starts_with('#') => {
                paragraph(&mut para, &section, &mut readme);
                section = line.trim_start_matches('#').trim().to_string();
            }
            None if line.trim().is_empty() => paragraph(&mut para, &section, &mut readme),
            None => para.push((n, line)),
        }
    }
    paragraph(&mut para, &section, &mut readme);
    assert!(fence.is_none(), "README.md: an unclosed code block");
    readme
}

/// Whether `help` names `flag` (`--config`, `-B`) as a flag: not inside a longer one.
fn names_flag(help: &str, flag: &str) -> bool {
    help.match_indices(flag).any(|(i, _)| {
        let before = help[..i].chars().next_back();
        let after = help[i + flag.len()..].chars().next();
        before.is_none_or(|c| c.is_whitespace() || matches!(c, ',' | '[' | '(' | '|'))
            && after.is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
    })
}

/// Arguments that are paths into the repository (first component a top-level directory
/// of it) must exist.
fn check_paths(cmd: &Cmd) {
    for w in cmd.args() {
        let Some((top, _)) = w.split_once('/') else {
            continue;
        };
        if top.is_empty() || top == "target" || !workspace().join(top).is_dir() {
            continue;
        }
        assert!(
            workspace().join(w).exists(),
            "{cmd}: {w} is no file of the repository"
        );
    }
}

/// Checks `name ARGS` (a calwatch binary); returns the subcommand's help.
fn check_calwatch(cmd: &Cmd, name: &str, args: &[String]) -> String {
    let sub = args
        .iter()
        .find(|w| !is_flag(w))
        .unwrap_or_else(|| panic!("{cmd}: no subcommand of {name}"));
    let (code, help, err) = run_to_end(&bin(name), &[sub, "--help"]);
    assert_eq!(
        code, 0,
        "{cmd}: `{sub}` is no subcommand of the built {name}:\n{err}"
    );
    for w in args.iter().filter(|w| is_flag(w)) {
        let flag = w.split('=').next().unwrap();
        assert!(
            names_flag(&help, flag),
            "{cmd}: `{name} {sub} --help` has no {flag}:\n{help}"
        );
    }
    help
}

/// The binary `cargo run` runs at the workspace root: the only default member's.
fn default_run_binary() -> String {
    let manifest = std::fs::read_to_string(workspace().join("Cargo.toml")).unwrap();
    let line = manifest
        .lines()
        .find(|l| l.trim_start().starts_with("default-members"))
        .expect("Cargo.toml: default-members (README's `cargo run -- …` relies on it)");
    let members: Vec<&str> = line.split('"').skip(1).step_by(2).collect();
    assert_eq!(members.len(), 1, "{line}: `cargo run` needs one member");
    let member = std::fs::read_to_string(workspace().join(members[0]).join("Cargo.toml")).unwrap();
    member
        .lines()
        .find_map(|l| {
            let v = l.strip_prefix("name")?.trim_start().strip_prefix('=')?;
            Some(v.trim().trim_matches('"').to_string())
        })
        .unwrap()
}

/// Checks `cargo SUB FLAGS [-- ARGS]`; returns cargo's help (and the binary's).
fn check_cargo(cmd: &Cmd) -> String {
    let args = cmd.args();
    let split = args.iter().position(|w| w == "--").unwrap_or(args.len());
    let (own, rest) = (&args[..split], args.get(split + 1..).unwrap_or(&[]));
    let sub = &own[0];
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let (code, mut help, err) = run_to_end(Path::new(&cargo), &[sub, "--help"]);
    assert_eq!(code, 0, "{cmd}: cargo {sub}: {err}");
    for w in own.iter().filter(|w| is_flag(w)) {
        let flag = w.split('=').next().unwrap();
        assert!(
            names_flag(&help, flag),
            "{cmd}: `cargo {sub}` has no {flag}"
        );
    }
    if !rest.is_empty() {
        assert_eq!(sub, "run", "{cmd}: arguments after -- of cargo {sub}");
        let binary = ["-p", "--package", "--bin"]
            .iter()
            .find_map(|f| cmd.value_of(f))
            .map(String::from)
            .unwrap_or_else(default_run_binary);
        assert!(
            binary.starts_with("calwatch-"),
            "{cmd}: this test checks the arguments of calwatch binaries only, not {binary}"
        );
        help += &check_calwatch(cmd, &binary, rest);
    }
    help
}

fn tests_run_usage() -> String {
    let script = workspace().join("tests/run");
    let (code, usage, err) = run_to_end(Path::new("bash"), &[script.to_str().unwrap(), "--help"]);
    assert_eq!(code, 0, "tests/run --help: {err}");
    usage
}

/// mbpoll's flags as this test understands them (see `mbpoll -h`).
#[derive(Debug)]
struct Mbpoll {
    unit: u8,
    port: u16,
    table: Table,
    format: String,
    reference: u16,
    count: u16,
    zero_based: bool,
    once: bool,
    big_endian: bool,
    host: String,
}

fn parse_mbpoll(cmd: &Cmd) -> Mbpoll {
    let mut m = Mbpoll {
        unit: 1,
        port: 502,
        table: Table::Holding,
        format: String::new(),
        reference: 1,
        count: 1,
        zero_based: false,
        once: false,
        big_endian: false,
        host: String::new(),
    };
    let mut words = cmd.args().iter();
    let number = |w: Option<&String>, what: &str| -> u16 {
        w.and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{cmd}: {what} needs a number"))
    };
    while let Some(w) = words.next() {
        match w.as_str() {
            "-m" => {
                let mode = words.next().map(String::as_str);
                assert_eq!(mode, Some("tcp"), "{cmd}: this test runs Modbus TCP only");
            }
            "-a" => m.unit = u8::try_from(number(words.next(), "-a")).unwrap(),
            "-p" => m.port = number(words.next(), "-p"),
            "-r" => m.reference = number(words.next(), "-r"),
            "-c" => m.count = number(words.next(), "-c"),
            "-o" | "-l" => {
                words.next();
            }
            "-0" => m.zero_based = true,
            "-1" => m.once = true,
            "-B" => m.big_endian = true,
            t if t.starts_with("-t") => {
                let spec = match t.strip_prefix("-t").unwrap() {
                    "" => words.next().unwrap().clone(),
                    joined => joined.to_string(),
                };
                let (table, format) = spec.split_once(':').unwrap_or((spec.as_str(), ""));
                m.table = match table {
                    "3" => Table::Input,
                    "4" => Table::Holding,
                    other => panic!("{cmd}: -t {other}: this test reads registers (3, 4) only"),
                };
                assert!(
                    ["", "hex", "int", "float"].contains(&format),
                    "{cmd}: -t {spec}: not a format of mbpoll 1.0 (hex, int, float)"
                );
                m.format = format.to_string();
            }
            h if !h.starts_with('-') => m.host = h.to_string(),
            other => panic!("{cmd}: {other}: a flag this test does not interpret; teach it"),
        }
    }
    m
}

/// The `[address]: value` lines mbpoll prints.
fn mbpoll_rows(out: &str) -> Vec<(u16, String)> {
    out.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix('[')?;
            let (addr, value) = rest.split_once("]:")?;
            Some((addr.parse().ok()?, value.trim().to_string()))
        })
        .collect()
}

/// The numbers an mbpoll value text may mean: `51234 (-14302)` is a 16-bit register read
/// unsigned and signed, `0xC822` hex, else one decimal.
fn shown_numbers(text: &str) -> Vec<f64> {
    if let Some(hex) = text.strip_prefix("0x") {
        return vec![f64::from(u16::from_str_radix(hex, 16).unwrap())];
    }
    text.split(|c: char| c.is_whitespace() || c == '(' || c == ')')
        .filter(|t| !t.is_empty())
        .map(|t| {
            t.parse()
                .unwrap_or_else(|_| panic!("mbpoll printed {text:?}"))
        })
        .collect()
}

/// Reads every numeric value of `table` in `profile` through tokio-modbus and calwatch's
/// decoder: register address → value.
async fn read_decoded(port: u16, unit: u8, profile: &Profile, table: Table) -> BTreeMap<u16, f64> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut ctx = tcp::connect_slave(addr, Slave(unit)).await.unwrap();
    let mut out = BTreeMap::new();
    for def in profile.values.iter().filter(|d| d.table == table) {
        let words = match table {
            Table::Input => ctx.read_input_registers(def.address, def.len).await,
            _ => ctx.read_holding_registers(def.address, def.len).await,
        }
        .unwrap()
        .unwrap();
        if let Decoded::Number(x) = def.decode(&words) {
            out.insert(def.address, x);
        }
    }
    out
}

/// The README's commands, checked against the programs' help and the repository's files.
#[test]
fn readme_commands_match_the_programs() {
    let readme = parse(&readme_text());
    assert!(
        readme.commands.len() >= 20,
        "the parser lost the README's commands: {:#?}",
        readme.commands
    );
    let mut helps: BTreeMap<String, String> = BTreeMap::new();
    let mut usage = None;
    let mut checked = 0;
    for cmd in &readme.commands {
        let help = match cmd.program() {
            "calwatch-agent" | "calwatch-gateway" => check_calwatch(cmd, cmd.program(), cmd.args()),
            // The demo is the gateway's subcommand (`cargo run -- demo`).
            "demo" => check_calwatch(cmd, "calwatch-gateway", &cmd.words),
            "cargo" => check_cargo(cmd),
            "tests/run" => {
                let usage = usage.get_or_insert_with(tests_run_usage);
                for w in cmd.args().iter().filter(|w| is_flag(w)) {
                    assert!(
                        names_flag(usage, w),
                        "{cmd}: tests/run --help has no {w}:\n{usage}"
                    );
                }
                usage.clone()
            }
            "mbpoll" => {
                if !tool("mbpoll", &["-V"], "mbpoll") {
                    continue;
                }
                parse_mbpoll(cmd); // every flag one this test interprets when it runs it
                let (_, help, _) = run_to_end(Path::new("mbpoll"), &["-h"]);
                for w in cmd.args().iter().filter(|w| is_flag(w)) {
                    let flag = if w.starts_with("-t") { "-t" } else { w };
                    assert!(names_flag(&help, flag), "{cmd}: mbpoll -h has no {flag}");
                }
                help
            }
            // Run by readme_backup_command_copies_the_registry.
            "sqlite3" => String::new(),
            other => panic!("{cmd}: this test has no check for {other}; teach it one"),
        };
        check_paths(cmd);
        helps
            .entry(cmd.section.clone())
            .or_default()
            .push_str(&help);
        checked += 1;
    }
    for span in &readme.bare_flags {
        let help = helps.get(&span.section).map(String::as_str).unwrap_or("");
        for flag in &span.flags {
            let flag = flag.split('=').next().unwrap();
            assert!(
                names_flag(help, flag),
                "README.md:{}: {flag} is no flag of a command section {:?} prints",
                span.line,
                span.section
            );
        }
    }
    eprintln!(
        "checked {checked} commands and {} spans of flags",
        readme.bare_flags.len()
    );
}

/// The mbpoll example prints what the simulator serves, decoded as the profile says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_mbpoll_example_prints_the_simulated_values() {
    let readme = parse(&readme_text());
    assert!(
        readme.commands.iter().any(|c| c.program() == "mbpoll"),
        "the README's mbpoll example is gone; remove this test with it"
    );
    if !tool("mbpoll", &["-V"], "mbpoll") {
        return;
    }
    for (at, cmd) in readme.commands.iter().enumerate() {
        if cmd.program() != "mbpoll" {
            continue;
        }
        // The simulator it reads: the last `calwatch-agent simulate` printed before it.
        let sim = readme.commands[..at]
            .iter()
            .rev()
            .find(|c| {
                c.program() == "calwatch-agent" && c.args().first().is_some_and(|s| s == "simulate")
            })
            .unwrap_or_else(|| panic!("{cmd}: no `calwatch-agent simulate` printed before it"));
        let profile_arg = sim
            .value_of("--profile")
            .unwrap_or_else(|| panic!("{cmd} reads {sim}, which names no --profile"));
        let profile_path = workspace().join(profile_arg);
        assert!(
            profile_path.is_file(),
            "{cmd} reads the simulator of {sim}, whose profile {profile_arg} is no file of \
             the repository: print the example for a profile the repository ships"
        );
        let listen = sim
            .value_of("--listen")
            .unwrap_or_else(|| panic!("{sim}: no --listen"));
        let m = parse_mbpoll(cmd);
        assert!(
            m.once,
            "{cmd}: without -1 mbpoll polls until stopped, printing every second"
        );
        let (host, port) = listen.rsplit_once(':').unwrap();
        assert_eq!(
            (m.host.as_str(), m.port.to_string().as_str()),
            (host, port),
            "{cmd} does not read the address of {sim}"
        );

        // Both as printed, but on a free port; the profile found from the workspace.
        let free = free_port();
        let mut sim_args: Vec<String> = sim.args().to_vec();
        for (i, w) in sim.args().iter().enumerate() {
            match w.as_str() {
                "--listen" => sim_args[i + 1] = format!("{host}:{free}"),
                "--profile" => sim_args[i + 1] = profile_path.display().to_string(),
                _ => {}
            }
        }
        let mut poll_args: Vec<String> = cmd.args().to_vec();
        let p = poll_args.iter().position(|w| w == "-p").unwrap();
        poll_args[p + 1] = free.to_string();

        let dir = std::env::temp_dir().join(format!("calwatch-readme-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sim_refs: Vec<&str> = sim_args.iter().map(String::as_str).collect();
        let mut simulator = Proc::start(&dir, "simulator", &bin("calwatch-agent"), &sim_refs);
        simulator.wait_stdout_line("simulating", Duration::from_secs(20));

        let profile = Profile::load(&profile_path).unwrap();
        let before = read_decoded(free, m.unit, &profile, m.table).await;
        let (code, out, err) = tokio::task::spawn_blocking(move || {
            let refs: Vec<&str> = poll_args.iter().map(String::as_str).collect();
            run_to_end_within(Path::new("mbpoll"), &refs, Duration::from_secs(20))
        })
        .await
        .unwrap();
        let after = read_decoded(free, m.unit, &profile, m.table).await;
        assert_eq!(code, 0, "{cmd}: exit {code}\n{out}{err}");
        let rows = mbpoll_rows(&out);
        assert_eq!(
            rows.len(),
            usize::from(m.count),
            "{cmd}: expected {} values\n{out}{err}",
            m.count
        );

        let wide = matches!(m.format.as_str(), "int" | "float");
        for (shown_at, text) in &rows {
            let register = if m.zero_based {
                *shown_at
            } else {
                shown_at - 1
            };
            let def = profile
                .values
                .iter()
                .find(|d| d.table == m.table && d.address == register)
                .unwrap_or_else(|| {
                    panic!(
                        "{cmd}: [{shown_at}] is register {register} of the {:?} table, which \
                         {profile_arg} maps to no value (mbpoll's -r counts from 1 unless -0)\n{out}",
                        m.table
                    )
                });
            let name = def.name.as_str();
            let types_fit = match m.format.as_str() {
                "float" => def.ty == ValueType::F32,
                "int" => matches!(def.ty, ValueType::I32 | ValueType::U32),
                _ => matches!(def.ty, ValueType::U16 | ValueType::I16),
            };
            assert!(
                types_fit,
                "{cmd}: [{shown_at}] shows {name} as {}, but it is {:?}",
                if wide {
                    format!("a 32-bit {}", m.format)
                } else {
                    "a 16-bit register".into()
                },
                def.ty
            );
            if wide {
                let want = if m.big_endian {
                    WordOrder::ABCD
                } else {
                    WordOrder::CDAB
                };
                assert_eq!(
                    def.order,
                    want,
                    "{cmd}: mbpoll reads 32-bit values {} (-B: high word first), but {name} \
                     is {:?}\n{out}",
                    if m.big_endian {
                        "high word first"
                    } else {
                        "low word first"
                    },
                    def.order
                );
            }
            assert!(
                def.scale == 1.0 && def.offset == 0.0,
                "{cmd}: mbpoll shows {name} raw, but the profile scales it"
            );
            let (b, a) = (before[&def.address], after[&def.address]);
            // The simulator's values move with time; mbpoll prints 6 significant digits.
            let tol = 1e-5 * b.abs().max(a.abs());
            let (lo, hi) = (b.min(a) - tol, b.max(a) + tol);
            let mut shown = shown_numbers(text);
            // mbpoll prints 32-bit integers signed.
            if m.format == "int" && def.ty == ValueType::U32 {
                let wrapped: Vec<f64> = shown.iter().map(|x| x + 4_294_967_296.0).collect();
                shown.extend(wrapped);
            }
            assert!(
                shown.iter().any(|x| (lo..=hi).contains(x)),
                "{cmd}: [{shown_at}] {name} shows {text}; calwatch reads {b} then {a}\n{out}"
            );
            eprintln!("[{shown_at}] {name}: mbpoll {text}, calwatch {b} then {a}");
        }
        drop(simulator);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// The backup command copies a real registry (WAL mode) as it is.
#[test]
fn readme_backup_command_copies_the_registry() {
    let readme = parse(&readme_text());
    let backups: Vec<&Cmd> = readme
        .commands
        .iter()
        .filter(|c| c.program() == "sqlite3")
        .collect();
    assert!(
        !backups.is_empty(),
        "the README's backup command is gone; remove this test with it"
    );
    if !tool("sqlite3", &["--version"], "sqlite3") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("calwatch-readme-backup-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("gateway.toml");
    std::fs::write(
        &config,
        "[mqtt]\nurl = \"mqtt://127.0.0.1:1883\"\n[registry]\npath = \"registry.db\"\n\
         [http]\nlisten = \"127.0.0.1:0\"\n[[sink]]\nkind = \"stdout\"\n",
    )
    .unwrap();
    let registry = workspace().join("config/registry");
    let (code, out, err) = run_to_end(
        &bin("calwatch-gateway"),
        &[
            "import",
            "--config",
            config.to_str().unwrap(),
            registry.join("devices.csv").to_str().unwrap(),
            registry.join("verifications.csv").to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    let dump = |file: &str| {
        let out = std::process::Command::new("sqlite3")
            .arg(dir.join(file))
            .arg(".dump")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let original = dump("registry.db");
    assert!(
        original.contains("INSERT INTO"),
        "an empty registry:\n{original}"
    );
    for cmd in backups {
        // The command exactly as printed, in the registry's directory.
        let out = std::process::Command::new("sh")
            .args(["-c", &cmd.text])
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let copies: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("registry-") && n.ends_with(".db"))
            .collect();
        assert_eq!(copies.len(), 1, "{cmd}: made {copies:?}");
        assert_eq!(dump(&copies[0]), original, "{cmd}: the copy differs");
        std::fs::remove_file(dir.join(&copies[0])).unwrap();
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn readme_parser_finds_commands_in_every_form() {
    let text = "# T\n\n## Sec\n\nRun `calwatch-agent run --config\n  a.toml` and `--speed`, \
                `demo --for 60`, `agent`.\n\n```sh\ntests/run --no-lint x   # calwatch-gateway check --config F: ok\n\
                # more words\n```\n";
    let r = parse(text);
    let cmds: Vec<(usize, String)> = r
        .commands
        .iter()
        .map(|c| (c.line, c.words.join(" ")))
        .collect();
    assert_eq!(
        cmds,
        [
            (5, "calwatch-agent run --config a.toml".to_string()),
            (6, "demo --for 60".to_string()),
            (9, "tests/run --no-lint x".to_string()),
            (9, "calwatch-gateway check --config F".to_string()),
        ]
    );
    assert_eq!(r.bare_flags.len(), 1);
    assert_eq!(r.bare_flags[0].flags, ["--speed"]);
    assert_eq!(r.commands[0].section, "Sec");
    assert!(names_flag("  --config <F>  x", "--config"));
    assert!(!names_flag("  --config-dir <F>", "--config"));
    assert!(!names_flag("  -r, --release", "-e"));
    assert!(names_flag("  -B            Big endian", "-B"));
    assert_eq!(
        shell_words("sqlite3 r.db \".backup r-$(date +%F).db\" [--n N]"),
        ["sqlite3", "r.db", ".backup r-$(date +%F).db", "--n", "N"]
    );
    assert_eq!(shown_numbers("51234 (-14302)"), [51234.0, -14302.0]);
}
