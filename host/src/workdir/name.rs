//! The names of work entries and what `/proc/PID/stat` says of a process (pure parsers).

/// What every work entry's name starts with (after an optional dot, for entries hidden beside
/// a target).
const PREFIX: &str = "imgforge-";

/// The process a work entry belongs to, as recorded in its name:
/// `imgforge-<pid>-<start time>-<kind>-<anything>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkName {
    /// The process id of the imgforge that made the entry.
    pub pid: u32,
    /// That process's start time (clock ticks after boot, `/proc/PID/stat` field 22); 0 when
    /// it could not be read, which makes the entry removable only once the pid is gone.
    pub start_time: u64,
}

impl WorkName {
    /// The start of the names this process gives entries of `kind` (e.g. `job`, `download`).
    pub fn prefix(&self, kind: &str) -> String {
        format!("{PREFIX}{}-{}-{kind}-", self.pid, self.start_time)
    }

    /// The process a work entry's `name` records, if it is one of ours.
    pub fn parse(name: &str) -> Option<Self> {
        let rest = name.strip_prefix('.').unwrap_or(name).strip_prefix(PREFIX)?;
        let (pid, rest) = rest.split_once('-')?;
        let (start_time, rest) = rest.split_once('-')?;
        if rest.is_empty() || !is_number(pid) || !is_number(start_time) {
            return None;
        }
        let pid = pid.parse().ok().filter(|p| *p > 0)?;
        Some(Self { pid, start_time: start_time.parse().ok()? })
    }
}

/// Only ASCII digits (`str::parse` also takes a leading `+`).
fn is_number(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// What `/proc/PID/stat` tells about a process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcStat {
    /// Field 3: `R`, `S`, `D`, `Z` (zombie), `X` (dead), ...
    pub state: char,
    /// Field 22: start time in clock ticks after boot.
    pub start_time: u64,
}

impl ProcStat {
    /// Parses the contents of `/proc/PID/stat`. The command name (field 2) is in parentheses
    /// and may hold spaces and parentheses itself, so fields are counted after the last `)`.
    pub fn parse(text: &str) -> Option<Self> {
        let (_, after_name) = text.rsplit_once(')')?;
        let mut fields = after_name.split_whitespace();
        let mut state = fields.next()?.chars();
        let (state, None) = (state.next()?, state.next()) else { return None };
        // Field 3 was the state; field 22 is 19 further.
        let start_time = fields.nth(18)?.parse().ok()?;
        Some(Self { state, start_time })
    }

    /// A zombie or dead process holds no file: what it made is left over.
    pub fn is_gone(&self) -> bool {
        matches!(self.state, 'Z' | 'X' | 'x')
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for (pid, start_time) in [(1, 0), (4242, 1_234_567), (u32::MAX, u64::MAX)] {
            let name = WorkName { pid, start_time };
            for kind in ["job", "qmp", "download"] {
                let made = format!("{}abc123", name.prefix(kind));
                assert_eq!(WorkName::parse(&made), Some(name), "{made}");
                assert_eq!(WorkName::parse(&format!(".{made}")), Some(name), "hidden {made}");
            }
        }
    }

    #[test]
    fn foreign_names_are_not_ours() {
        for name in [
            "imgforge-abc123",         // the old unnumbered work dirs
            "imgforge-12-34",          // nothing after the start time
            "imgforge-12-34-",         // nothing after the start time
            "imgforge--34-job-x",      // no pid
            "imgforge-12--job-x",      // no start time
            "imgforge-+12-34-job-x",   // a sign is not a digit
            "imgforge-0-34-job-x",     // pid 0 is no process
            "imgforge-4294967296-1-x", // pid beyond u32
            "imgforge-1-18446744073709551616-x",
            "..imgforge-12-34-job-x",
            "x.imgforge-12-34-job-x",
            ".disk.img.imgforge-1234", // the old temporary output name
            "imgforge-fixtures",
            "systemd-private-abc",
            "",
        ] {
            assert_eq!(WorkName::parse(name), None, "{name}");
        }
    }

    #[test]
    fn proc_stat_fields_are_counted_after_the_command_name() {
        let stat = "4242 (imgforge) S 1 4242 4242 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(ProcStat::parse(stat), Some(ProcStat { state: 'S', start_time: 987_654 }));
        // A command name may hold spaces and parentheses.
        let tricky = "7 (a) Z 1 2 (b) R) Z 1 7 7 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 55 1000 10\n";
        let parsed = ProcStat::parse(tricky).unwrap();
        assert_eq!(parsed, ProcStat { state: 'Z', start_time: 55 });
        assert!(parsed.is_gone());
        for bad in [
            "",
            "4242 (imgforge) S 1 2 3",
            "4242 (imgforge) SS 1 4242 4242 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 9 1 1",
        ] {
            assert_eq!(ProcStat::parse(bad), None, "{bad}");
        }
        let own = std::fs::read_to_string("/proc/self/stat").unwrap();
        let own = ProcStat::parse(&own).unwrap();
        assert!(!own.is_gone());
        assert!(own.start_time > 0);
        assert_eq!(crate::workdir::this_process().start_time, own.start_time);
    }
}
