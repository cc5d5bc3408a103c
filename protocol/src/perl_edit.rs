//! `--edit FILE:EXPR`: the part of Perl that virt-customize's expressions use, run without Perl.
//!
//! virt-customize (through virt-edit's `edit_file_perl`) evaluates EXPR with Perl once per line
//! of FILE, the line (with its newline) in `$_`, and writes back whatever `$_` holds afterwards:
//! an empty `$_` deletes the line, a `$_` without its newline joins the next line to it. Here
//! the host parses EXPR into a [`Program`] — refusing anything outside the forms below, so no
//! Perl is ever needed — and the helper parses it again and [`Program::apply`]s it to the bytes.
//!
//! Regular expressions follow Perl's rules for a byte string (what Perl reads from a file with
//! no decoding layer): `.` is one byte, `\w`/`\d`/`\s` and `/i` are ASCII-only, and a non-ASCII
//! character in the pattern is its UTF-8 bytes. They run on the `regex` crate's byte engine,
//! which has no backtracking: look-around, backreferences in the pattern, atomic groups and
//! possessive quantifiers are refused.

use regex::bytes::{Captures, Regex, RegexBuilder};
use thiserror::Error;

/// What imgforge runs of Perl, for the refusal message and `--help`.
pub const SUPPORTED_FORMS: &str = "s/REGEX/REPLACEMENT/[gimsx] (any delimiter Perl takes: s|a|b|, s{a}{b}), \
     tr/LIST/LIST/ (or y///), $_ = \"STRING\" or '...' ($_ .= appends; \"...\" may hold $_ and \\n \\t escapes; \
     . joins), each optionally followed by `if /REGEX/` or `unless /REGEX/`, several joined by `;`";

/// Most statements one expression may hold (a command-line expression has a few).
const MAX_STATEMENTS: usize = 64;

/// Compiled size limit of one regular expression: a hostile or mistaken pattern fails on the
/// host instead of filling the helper's memory.
const REGEX_SIZE_LIMIT_BYTES: usize = 1 << 20;

/// Longest line, newline included, that [`Program::apply_line`] takes or makes: what one line
/// of a file may hold in the helper's memory (its default 1 GiB, or 128 MiB with `-m 128`) a few
/// times over. A hostile image can hold a sparse file that is one line of gigabytes, and an
/// expression can grow a line without end (`$_ .= $_` repeated); both fail here instead of
/// exhausting the helper's memory.
pub const MAX_LINE_BYTES: usize = 16 << 20;

/// A line longer than [`MAX_LINE_BYTES`] before or after the expression.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error(
    "a line longer than {limit} bytes, before or after the expression (imgforge edits lines of up to {limit} bytes)"
)]
pub struct LineTooLong {
    /// The limit that was passed.
    pub limit: usize,
}

/// An expression imgforge cannot run as Perl would.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("cannot run the Perl expression {expr:?}: {reason}; imgforge runs only {SUPPORTED_FORMS}")]
pub struct PerlEditError {
    /// The whole expression as given.
    pub expr: String,
    /// What in it is not supported, or is malformed.
    pub reason: String,
}

/// A parsed `--edit` expression, ready to apply to a file's bytes.
#[derive(Debug, Clone)]
pub struct Program {
    statements: Vec<Statement>,
}

#[derive(Debug, Clone)]
struct Statement {
    action: Action,
    condition: Option<Condition>,
}

/// `if /REGEX/` (`negated: false`) or `unless /REGEX/` / `if !/REGEX/`.
#[derive(Debug, Clone)]
struct Condition {
    regex: Regex,
    negated: bool,
}

#[derive(Debug, Clone)]
enum Action {
    /// `s/REGEX/REPLACEMENT/FLAGS`.
    Substitute { regex: Regex, replacement: Vec<Piece>, global: bool },
    /// `tr/FROM/TO/`: byte `b` becomes `table[b]`.
    Transliterate { table: Box<[u8; 256]> },
    /// `$_ = …` (or `.=` when `append`).
    Assign { value: Vec<Piece>, append: bool },
}

/// A part of a replacement or string: bytes, a capture group, or the current line.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Literal(Vec<u8>),
    /// `$N`, `${N}`, `\N` (0 for `$&`).
    Group(usize),
    /// `$_` inside a double-quoted string.
    Line,
}

/// Where the parser is in the expression.
struct Cursor<'a> {
    chars: Vec<char>,
    pos: usize,
    expr: &'a str,
}

type Parsed<T> = Result<T, String>;

impl Program {
    /// Parses `expr`, refusing anything but the supported forms.
    pub fn parse(expr: &str) -> Result<Self, PerlEditError> {
        let fail = |reason: String| PerlEditError { expr: expr.to_owned(), reason };
        let mut cur = Cursor { chars: expr.chars().collect(), pos: 0, expr };
        let mut statements = Vec::new();
        loop {
            cur.skip_space();
            if cur.at_end() {
                break;
            }
            if statements.len() == MAX_STATEMENTS {
                return Err(fail(format!("more than {MAX_STATEMENTS} statements")));
            }
            statements.push(cur.statement().map_err(fail)?);
            cur.skip_space();
            match cur.peek() {
                None => break,
                Some(';') => cur.pos += 1,
                Some(c) => return Err(fail(format!("unexpected {:?} at {:?}", c, cur.rest()))),
            }
        }
        if statements.is_empty() {
            return Err(fail("the expression is empty".into()));
        }
        Ok(Self { statements })
    }

    /// Applies the program to each line of `input`, as `edit_file_perl`'s loop does.
    pub fn apply(&self, input: &[u8]) -> Result<Vec<u8>, LineTooLong> {
        let mut out = Vec::with_capacity(input.len());
        for line in input.split_inclusive(|&b| b == b'\n') {
            out.extend_from_slice(&self.apply_line(line)?);
        }
        Ok(out)
    }

    /// Applies the program to one line (with its newline, if it has one); a line longer than
    /// [`MAX_LINE_BYTES`], as given or as the expression makes it, is refused.
    pub fn apply_line(&self, line: &[u8]) -> Result<Vec<u8>, LineTooLong> {
        self.apply_line_within(line, MAX_LINE_BYTES)
    }

    fn apply_line_within(&self, line: &[u8], max: usize) -> Result<Vec<u8>, LineTooLong> {
        let too_long = LineTooLong { limit: max };
        if line.len() > max {
            return Err(too_long);
        }
        let mut text = line.to_vec();
        for st in &self.statements {
            if let Some(cond) = &st.condition {
                if cond.regex.is_match(&text) == cond.negated {
                    continue;
                }
            }
            text = match &st.action {
                Action::Substitute { regex, replacement, global } => {
                    substitute(regex, replacement, *global, &text, max).ok_or(too_long)?
                }
                Action::Transliterate { table } => text.iter().map(|&b| table[usize::from(b)]).collect(),
                Action::Assign { value, append } => {
                    // Measured before anything is allocated: `$_ . $_ . ...` multiplies a line.
                    let start = if *append { text.len() } else { 0 };
                    let len = value.iter().try_fold(start, |len, piece| {
                        len.checked_add(match piece {
                            Piece::Literal(bytes) => bytes.len(),
                            Piece::Line => text.len(),
                            // The parser allows groups only in replacements.
                            Piece::Group(_) => 0,
                        })
                    });
                    if len.is_none_or(|len| len > max) {
                        return Err(too_long);
                    }
                    let mut new = if *append { text.clone() } else { Vec::new() };
                    for piece in value {
                        match piece {
                            Piece::Literal(bytes) => new.extend_from_slice(bytes),
                            Piece::Line => new.extend_from_slice(&text),
                            Piece::Group(_) => {}
                        }
                    }
                    new
                }
            };
        }
        Ok(text)
    }
}

/// `s///` on one line: the first match, or every match with `/g`. Perl's `/g` takes an empty
/// match right where a non-empty one ended (`s/a*/-/g` makes `caf` into `-c--f-`), and never a
/// second empty match at one place; the regex crate's own iterator skips the first kind.
fn substitute(regex: &Regex, replacement: &[Piece], global: bool, text: &[u8], max: usize) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len());
    let mut copied = 0;
    let mut from = 0;
    let mut empty_at = None;
    while let Some(caps) = regex.captures_at(text, from) {
        let Some(whole) = caps.get(0) else { break };
        if whole.is_empty() && empty_at == Some(whole.start()) {
            if whole.start() >= text.len() {
                break;
            }
            from = whole.start() + 1;
            continue;
        }
        extend_within(&mut out, &text[copied..whole.start()], max)?;
        expand(replacement, &caps, text, &mut out, max)?;
        copied = whole.end();
        from = whole.end();
        empty_at = whole.is_empty().then_some(whole.end());
        if !global {
            break;
        }
    }
    extend_within(&mut out, &text[copied..], max)?;
    Some(out)
}

/// Appends `bytes` unless `out` would pass `max` bytes (`None` then).
fn extend_within(out: &mut Vec<u8>, bytes: &[u8], max: usize) -> Option<()> {
    if bytes.len() > max.saturating_sub(out.len()) {
        return None;
    }
    out.extend_from_slice(bytes);
    Some(())
}

fn expand(replacement: &[Piece], caps: &Captures<'_>, line: &[u8], out: &mut Vec<u8>, max: usize) -> Option<()> {
    for piece in replacement {
        match piece {
            Piece::Literal(bytes) => extend_within(out, bytes, max)?,
            // A group that did not take part is empty, as Perl's undef interpolates.
            Piece::Group(n) => extend_within(out, caps.get(*n).map_or(&[][..], |m| m.as_bytes()), max)?,
            Piece::Line => extend_within(out, line, max)?,
        }
    }
    Some(())
}

fn is_word(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The closing delimiter Perl pairs with `open`.
fn closing(open: char) -> char {
    match open {
        '(' => ')',
        '[' => ']',
        '{' => '}',
        '<' => '>',
        c => c,
    }
}

/// Perl's regex flags that imgforge supports, parsed from the letters after the last delimiter.
#[derive(Debug, Default, Clone, Copy)]
struct Flags {
    global: bool,
    insensitive: bool,
    dot_all: bool,
    extended: bool,
}

impl Cursor<'_> {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn peek_at(&self, ahead: usize) -> Option<char> {
        self.chars.get(self.pos + ahead).copied()
    }

    fn at_end(&self) -> bool {
        self.pos >= self.chars.len()
    }

    fn rest(&self) -> String {
        self.chars[self.pos..].iter().collect()
    }

    fn skip_space(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.pos += 1;
        }
    }

    fn eat(&mut self, text: &str) -> bool {
        let n = text.chars().count();
        let matches = self.chars.get(self.pos..self.pos + n).is_some_and(|s| s.iter().copied().eq(text.chars()));
        if matches {
            self.pos += n;
        }
        matches
    }

    /// True when a keyword (`if`, `tr`, ...) stands here as a whole word.
    fn eat_word(&mut self, word: &str) -> bool {
        let n = word.chars().count();
        let end_ok = self.peek_at(n).is_none_or(|c| !is_word(c));
        end_ok && self.eat(word)
    }

    fn statement(&mut self) -> Parsed<Statement> {
        let start = self.pos;
        let mut bound = false;
        if self.eat("$_") {
            self.skip_space();
            bound = self.eat("=~");
            if !bound {
                return Ok(Statement { action: self.assignment()?, condition: self.modifier()? });
            }
            self.skip_space();
        }
        let action = if self.operator("s") {
            self.substitution()?
        } else if self.operator("tr") || self.operator("y") {
            self.transliteration()?
        } else {
            let what = if bound {
                "after $_ =~, only s/// and tr/// are supported"
            } else {
                "is not one of the supported forms"
            };
            self.pos = start;
            return Err(format!("{:?} {what}", self.rest()));
        };
        Ok(Statement { action, condition: self.modifier()? })
    }

    /// `name` followed by a delimiter (`s/`, `tr|`, `y{`), consumed when found.
    fn operator(&mut self, name: &str) -> bool {
        let n = name.chars().count();
        let delimited = self.peek_at(n).is_some_and(|c| !is_word(c) && !c.is_whitespace());
        delimited && self.eat(name)
    }

    /// An optional statement modifier: `if COND` or `unless COND`.
    fn modifier(&mut self) -> Parsed<Option<Condition>> {
        self.skip_space();
        Ok(if self.eat_word("if") {
            Some(self.condition(false)?)
        } else if self.eat_word("unless") {
            Some(self.condition(true)?)
        } else {
            None
        })
    }

    /// After `$_`: `= STRING` or `.= STRING`, STRING being quoted strings and `$_` joined by `.`.
    fn assignment(&mut self) -> Parsed<Action> {
        self.skip_space();
        let append = if self.eat(".=") {
            true
        } else if self.peek() == Some('=') && self.peek_at(1) != Some('~') && self.peek_at(1) != Some('=') {
            self.pos += 1;
            false
        } else {
            return Err(format!("after $_, expected `= \"...\"` or `.= \"...\"`, found {:?}", self.rest()));
        };
        let mut value = Vec::new();
        loop {
            self.skip_space();
            if self.eat("$_") {
                value.push(Piece::Line);
            } else if self.eat("\"") {
                let body = self.delimited('"')?;
                value.extend(interpolated(&body, Interpolation::String)?);
            } else if self.eat("'") {
                let body = self.delimited('\'')?;
                value.push(Piece::Literal(single_quoted(&body).into_bytes()));
            } else {
                return Err(format!("expected a quoted string or $_, found {:?}", self.rest()));
            }
            self.skip_space();
            if self.peek() == Some('.') && self.peek_at(1) != Some('=') {
                self.pos += 1;
            } else {
                break;
            }
        }
        Ok(Action::Assign { value, append })
    }

    /// The two delimited parts of `s` or `tr`, with the first opening delimiter.
    fn two_parts(&mut self) -> Parsed<(char, String, String)> {
        let open = self.delimiter()?;
        let first = self.delimited(open)?;
        // `s{a}{b}`, `s{a} /b/`: a bracketed first part lets the second choose its own.
        let second = if closing(open) != open {
            self.skip_space();
            self.delimiter()?
        } else {
            open
        };
        Ok((open, first, self.delimited(second)?))
    }

    /// After `s`: the two delimited parts and the flags.
    fn substitution(&mut self) -> Parsed<Action> {
        let (open, pattern, replacement_text) = self.two_parts()?;
        let flags = self.flags("gimsx", "s///")?;
        let regex = compile(&pattern, flags, open)?;
        let replacement = interpolated(&replacement_text, Interpolation::Replacement)?;
        let groups = regex.captures_len() - 1;
        for piece in &replacement {
            if let Piece::Group(n) = piece {
                if *n > groups {
                    return Err(format!("the replacement uses group {n} but the pattern {pattern:?} has {groups}"));
                }
            }
        }
        Ok(Action::Substitute { regex, replacement, global: flags.global })
    }

    /// After `tr` or `y`: two lists and no flags.
    fn transliteration(&mut self) -> Parsed<Action> {
        let (_, from_text, to_text) = self.two_parts()?;
        if let Some(c) = self.peek().filter(|c| is_word(*c)) {
            return Err(format!("tr/// flag {c:?} is not supported (none are)"));
        }
        let from = tr_list(&from_text)?;
        let to = tr_list(&to_text)?;
        let to = if to.is_empty() { from.clone() } else { to };
        let mut table: Box<[u8; 256]> = Box::new(std::array::from_fn(|b| b as u8));
        let mut seen = [false; 256];
        for (i, &b) in from.iter().enumerate() {
            if !seen[usize::from(b)] {
                seen[usize::from(b)] = true;
                // A shorter replacement list repeats its last character, as in Perl.
                table[usize::from(b)] = to[i.min(to.len() - 1)];
            }
        }
        Ok(Action::Transliterate { table })
    }

    /// After `if`/`unless`: `/REGEX/FLAGS`, `m<d>REGEX<d>FLAGS`, or either after `!`.
    fn condition(&mut self, unless: bool) -> Parsed<Condition> {
        self.skip_space();
        let negated = self.eat("!") != unless;
        self.skip_space();
        let open = if self.eat("/") {
            '/'
        } else if self.operator("m") {
            self.delimiter()?
        } else {
            return Err(format!("a condition must be /REGEX/ (or m{{REGEX}}), found {:?}", self.rest()));
        };
        let pattern = self.delimited(open)?;
        let flags = self.flags("imsx", "a condition's match")?;
        Ok(Condition { regex: compile(&pattern, flags, open)?, negated })
    }

    fn delimiter(&mut self) -> Parsed<char> {
        match self.peek() {
            Some('\'') => Err("the ' delimiter (no interpolation) is not supported: use / or another".into()),
            Some(c) if !is_word(c) && !c.is_whitespace() => {
                self.pos += 1;
                Ok(c)
            }
            Some(c) => Err(format!("{c:?} cannot delimit a Perl pattern")),
            None => Err("the expression ends where a delimiter should be".into()),
        }
    }

    /// The text up to the delimiter closing `open` (nested pairs counted for brackets), with
    /// the backslash dropped before an escaped delimiter, as Perl's first parsing pass does.
    fn delimited(&mut self, open: char) -> Parsed<String> {
        let close = closing(open);
        let mut depth = 0usize;
        let mut text = String::new();
        while let Some(c) = self.peek() {
            self.pos += 1;
            if c == '\\' {
                match self.peek() {
                    Some(next) if next == open || next == close => text.push(next),
                    Some(next) => {
                        text.push('\\');
                        text.push(next);
                    }
                    None => break,
                }
                self.pos += 1;
            } else if c == close && depth == 0 {
                return Ok(text);
            } else {
                if close != open {
                    if c == open {
                        depth += 1;
                    } else if c == close {
                        depth -= 1;
                    }
                }
                text.push(c);
            }
        }
        Err(format!("no closing {close:?} in {:?}", self.expr))
    }

    fn flags(&mut self, allowed: &str, what: &str) -> Parsed<Flags> {
        let mut flags = Flags::default();
        while let Some(c) = self.peek().filter(|c| is_word(*c)) {
            match c {
                'g' | 'i' | 'm' | 's' | 'x' if allowed.contains(c) => {}
                'e' => return Err("the e flag runs Perl code: not supported".into()),
                _ => return Err(format!("{what} flag {c:?} is not supported (only {allowed})")),
            }
            match c {
                'g' => flags.global = true,
                'i' => flags.insensitive = true,
                's' => flags.dot_all = true,
                'x' => flags.extended = true,
                // Each $_ is one line, where /m's ^ and $ match where they do without it.
                _ => {}
            }
            self.pos += 1;
        }
        Ok(flags)
    }
}

/// `'...'`: only `\\` and `\'` are escapes.
fn single_quoted(body: &str) -> String {
    let mut out = String::new();
    let mut chars = body.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' && matches!(chars.peek(), Some('\\' | '\'')) {
            out.push(chars.next().unwrap_or('\\'));
        } else {
            out.push(c);
        }
    }
    out
}

/// What may be interpolated in a double-quoted context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Interpolation {
    /// `s///`'s replacement: `$N`, `${N}`, `\N`, `$&`.
    Replacement,
    /// A `"..."` string: `$_`.
    String,
}

/// A replacement or `"..."` string: Perl's double-quote escapes and the variables `kind` allows.
fn interpolated(body: &str, kind: Interpolation) -> Parsed<Vec<Piece>> {
    let chars: Vec<char> = body.chars().collect();
    let mut pieces = Vec::new();
    let mut literal = Vec::new();
    let mut i = 0;
    let push = |pieces: &mut Vec<Piece>, literal: &mut Vec<u8>, piece: Piece| {
        if !literal.is_empty() {
            pieces.push(Piece::Literal(std::mem::take(literal)));
        }
        pieces.push(piece);
    };
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        i += 1;
        match c {
            '\\' => {
                let Some(e) = next else { return Err("a trailing backslash".into()) };
                i += 1;
                match e {
                    'n' => literal.push(b'\n'),
                    't' => literal.push(b'\t'),
                    'r' => literal.push(b'\r'),
                    'f' => literal.push(0x0c),
                    'a' => literal.push(0x07),
                    'e' => literal.push(0x1b),
                    '0' => literal.push(0),
                    '1'..='9' if kind == Interpolation::Replacement => {
                        push(&mut pieces, &mut literal, Piece::Group(e as usize - '0' as usize));
                    }
                    'x' => {
                        let (byte, used) = hex_escape(&chars[i..])?;
                        literal.push(byte);
                        i += used;
                    }
                    e if e.is_ascii_alphanumeric() => {
                        return Err(format!("the escape \\{e} is not supported (only \\n \\t \\r \\f \\a \\e \\0 \\xHH, \\1-\\9 in a replacement, and \\ before punctuation)"));
                    }
                    e => literal.extend_from_slice(e.encode_utf8(&mut [0; 4]).as_bytes()),
                }
            }
            '$' => {
                let digits: String = chars[i..].iter().take_while(|c| c.is_ascii_digit()).collect();
                if kind == Interpolation::Replacement && !digits.is_empty() {
                    i += digits.len();
                    push(
                        &mut pieces,
                        &mut literal,
                        Piece::Group(digits.parse().map_err(|_| "group number too large")?),
                    );
                } else if kind == Interpolation::Replacement && next == Some('&') {
                    i += 1;
                    push(&mut pieces, &mut literal, Piece::Group(0));
                } else if next == Some('{') {
                    let inner: String = chars[i + 1..].iter().take_while(|c| **c != '}').collect();
                    let closed = chars.get(i + 1 + inner.chars().count()) == Some(&'}');
                    match (kind, inner.parse::<usize>()) {
                        (Interpolation::Replacement, Ok(n)) if closed => {
                            push(&mut pieces, &mut literal, Piece::Group(n))
                        }
                        (Interpolation::String, _) if closed && inner == "_" => {
                            push(&mut pieces, &mut literal, Piece::Line)
                        }
                        _ => return Err(format!("${{{inner}}} would interpolate a Perl variable: not supported")),
                    }
                    i += inner.chars().count() + 2;
                } else if kind == Interpolation::String
                    && next == Some('_')
                    && chars.get(i + 1).is_none_or(|c| !is_word(*c))
                {
                    i += 1;
                    push(&mut pieces, &mut literal, Piece::Line);
                } else {
                    let name: String = chars[i..].iter().take_while(|c| is_word(**c)).collect();
                    let allowed = match kind {
                        Interpolation::Replacement => "$1..$9, ${1}, $&",
                        Interpolation::String => "$_",
                    };
                    return Err(if name.is_empty() && next.is_none() {
                        format!("a final $ in {body:?}: write \\$ for a dollar sign")
                    } else {
                        format!(
                            "${} would interpolate a Perl variable: only {allowed} are supported (write \\$ for a dollar sign)",
                            if name.is_empty() { next.map(String::from).unwrap_or_default() } else { name }
                        )
                    });
                }
            }
            '@' if next.is_some_and(|n| is_word(n) || matches!(n, '{' | '$' | ':' | '-' | '+')) => {
                return Err(format!(
                    "@{} would interpolate a Perl array: write \\@ for an at sign",
                    next.unwrap_or(' ')
                ));
            }
            c => {
                literal.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes());
            }
        }
    }
    if !literal.is_empty() {
        pieces.push(Piece::Literal(literal));
    }
    Ok(pieces)
}

/// `\xHH` or `\x{H..}` after the `x`: the byte and how many characters it used.
fn hex_escape(rest: &[char]) -> Parsed<(u8, usize)> {
    let (digits, used): (String, usize) = if rest.first() == Some(&'{') {
        let end = rest.iter().position(|c| *c == '}').ok_or("an unterminated \\x{ (no closing '}')")?;
        (rest[1..end].iter().collect(), end + 1)
    } else {
        let d: String = rest.iter().take(2).take_while(|c| c.is_ascii_hexdigit()).collect();
        let n = d.len();
        (d, n)
    };
    match u8::from_str_radix(&digits, 16) {
        Ok(b) => Ok((b, used)),
        Err(_) if digits.is_empty() => Ok((0, used)),
        Err(_) => Err(format!("\\x{{{digits}}} is not a byte (only \\x00 to \\xff are supported)")),
    }
}

/// A `tr///` list: bytes, `a-z` ranges, and the escapes of a double-quoted string.
fn tr_list(text: &str) -> Parsed<Vec<u8>> {
    let chars: Vec<char> = text.chars().collect();
    let mut bytes = Vec::new();
    let mut i = 0;
    // Each item: a byte, and whether it came escaped (an escaped '-' is no range).
    let mut items: Vec<(u8, bool)> = Vec::new();
    while i < chars.len() {
        let c = chars[i];
        i += 1;
        if c == '\\' {
            let Some(e) = chars.get(i).copied() else { return Err("a trailing backslash in tr///".into()) };
            i += 1;
            let b = match e {
                'n' => b'\n',
                't' => b'\t',
                'r' => b'\r',
                'f' => 0x0c,
                'e' => 0x1b,
                '0' => 0,
                'x' => {
                    let (b, used) = hex_escape(&chars[i..])?;
                    i += used;
                    b
                }
                e if e.is_ascii_punctuation() => e as u8,
                e => return Err(format!("the escape \\{e} is not supported in tr///")),
            };
            items.push((b, true));
        } else if c.is_ascii() {
            items.push((c as u8, false));
        } else {
            return Err(format!("{c:?}: tr/// takes ASCII characters only"));
        }
    }
    let mut j = 0;
    while j < items.len() {
        let (b, _) = items[j];
        if j + 2 < items.len() && items[j + 1] == (b'-', false) {
            let (end, _) = items[j + 2];
            if end < b {
                return Err(format!("invalid tr/// range {}-{}", b as char, end as char));
            }
            bytes.extend(b..=end);
            j += 3;
        } else {
            bytes.push(b);
            j += 1;
        }
    }
    Ok(bytes)
}

/// Compiles a Perl pattern (delimited by `delimiter`) for one line of bytes.
fn compile(pattern: &str, flags: Flags, delimiter: char) -> Parsed<Regex> {
    if pattern.is_empty() {
        return Err("an empty pattern (Perl's \"last successful pattern\") is not supported".into());
    }
    let translated = translate(pattern, flags.extended)
        .map_err(|reason| format!("in the pattern {delimiter}{pattern}{delimiter}: {reason}"))?;
    RegexBuilder::new(&translated)
        .unicode(false)
        .case_insensitive(flags.insensitive)
        .dot_matches_new_line(flags.dot_all)
        .ignore_whitespace(flags.extended)
        .size_limit(REGEX_SIZE_LIMIT_BYTES)
        .build()
        .map_err(|e| {
            format!("the pattern {pattern:?} is not one the regex engine takes: {}", last_line(&e.to_string()))
        })
}

/// The regex crate's error without its picture of the (translated) pattern.
fn last_line(text: &str) -> String {
    text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or(text).trim().to_owned()
}

/// The `\xHH` escapes of a character's UTF-8 bytes: Perl matches a byte string byte by byte.
fn byte_escapes(c: char, out: &mut String) {
    for b in c.encode_utf8(&mut [0; 4]).bytes() {
        out.push_str(&format!("\\x{b:02X}"));
    }
}

/// Rewrites a Perl pattern into the regex crate's syntax with the same meaning on one line:
/// `^` is the line's start, `$` its end or before its final newline, `{` that opens no
/// quantifier is literal, `[` inside a class is literal. Perl-only syntax with another meaning
/// here, or none, is refused.
fn translate(pattern: &str, extended: bool) -> Parsed<String> {
    let chars: Vec<char> = pattern.chars().collect();
    let mut out = String::with_capacity(pattern.len() * 2);
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        i += 1;
        match c {
            '\\' => {
                let Some(e) = next else { return Err("a trailing backslash".into()) };
                i += 1;
                i += escape(e, &chars[i..], false, &mut out)?;
            }
            '[' => i += class(&chars[i..], &mut out)?,
            '^' => out.push_str(r"\A"),
            '$' if next.is_none_or(|n| n == ')' || n == '|' || (extended && (n.is_whitespace() || n == '#'))) => {
                // Perl's $ (with or without /m) on a one-line $_: the end, or before a final
                // newline; the regex crate's multi-line $ is exactly that when \n is last.
                out.push_str("(?m:$)");
            }
            '$' => {
                return Err(format!(
                    "${} would interpolate a Perl variable (write \\$ for a dollar sign)",
                    rest_word(&chars[i..])
                ))
            }
            '@' if next.is_some_and(|n| is_word(n) || matches!(n, '{' | '$' | ':')) => {
                return Err(format!(
                    "@{} would interpolate a Perl array (write \\@ for an at sign)",
                    rest_word(&chars[i..])
                ));
            }
            '{' => {
                match quantifier(&chars[i..]) {
                    Some((text, used)) => {
                        out.push_str(&text);
                        i += used;
                        if chars.get(i) == Some(&'+') {
                            return Err(format!("the possessive quantifier {text}+ is not supported: the regex engine does not backtrack"));
                        }
                    }
                    None => out.push_str(r"\{"),
                }
            }
            '}' => out.push_str(r"\}"),
            '(' if next == Some('?') => {
                let rest: String = chars[i..].iter().take(4).collect();
                if rest.starts_with("?#") {
                    // A Perl comment: dropped up to its closing parenthesis.
                    let end = chars[i..].iter().position(|c| *c == ')').ok_or("an unterminated (?# comment")?;
                    i += end + 1;
                    continue;
                }
                for (start, what) in [
                    ("?=", "look-ahead (?=...)"),
                    ("?!", "negative look-ahead (?!...)"),
                    ("?<=", "look-behind (?<=...)"),
                    ("?<!", "negative look-behind (?<!...)"),
                    ("?>", "an atomic group (?>...)"),
                    ("?|", "a branch reset (?|...)"),
                    ("?{", "code (?{...})"),
                    ("??", "code (??{...})"),
                    ("?&", "recursion (?&name)"),
                    ("?R", "recursion (?R)"),
                ] {
                    if rest.starts_with(start) {
                        return Err(format!("{what} is not supported: the regex engine does not backtrack"));
                    }
                }
                inline_flags(&chars[i + 1..])?;
                out.push('(');
            }
            '#' if extended => {
                // A comment to the end of the line: copied, so nothing in it is translated.
                out.push('#');
                while let Some(&d) = chars.get(i) {
                    i += 1;
                    out.push(d);
                    if d == '\n' {
                        break;
                    }
                }
            }
            c if !c.is_ascii() => byte_escapes(c, &mut out),
            '*' | '+' | '?' if next == Some('+') => {
                return Err(format!(
                    "the possessive quantifier {c}+ is not supported: the regex engine does not backtrack"
                ));
            }
            c => out.push(c),
        }
    }
    Ok(out)
}

/// Checks the flags of `(?flags)` or `(?flags:...)` (given what follows the `?`): Perl's
/// `i`, `m`, `s` and `x` mean the same to the regex crate; any other letter either means
/// something else there (`U` swaps greediness, `u` turns on Unicode classes, `R` changes line
/// ends) or is not supported by it, so it is refused rather than silently changing the match.
fn inline_flags(rest: &[char]) -> Parsed<()> {
    let flags: String = rest.iter().take_while(|c| c.is_ascii_alphabetic() || matches!(c, '-' | '^')).collect();
    let follows = rest.get(flags.chars().count());
    if flags.is_empty() || !matches!(follows, Some(':') | Some(')')) {
        // A named group `(?<name>` or `(?P<name>`, or something the regex crate judges.
        return Ok(());
    }
    match flags.chars().find(|f| !matches!(f, 'i' | 'm' | 's' | 'x' | '-')) {
        Some(f) => Err(format!("the inline flag '{f}' in (?{flags}) is not supported (only i, m, s and x are)")),
        None => Ok(()),
    }
}

fn rest_word(chars: &[char]) -> String {
    let word: String = chars.iter().take_while(|c| is_word(**c)).collect();
    if word.is_empty() {
        chars.first().map(char::to_string).unwrap_or_default()
    } else {
        word
    }
}

/// `{n}`, `{n,}`, `{n,m}` or `{,m}` after the `{`: the regex crate's text and characters used.
fn quantifier(rest: &[char]) -> Option<(String, usize)> {
    let end = rest.iter().position(|c| *c == '}')?;
    let inner: String = rest[..end].iter().collect();
    let (min, max) = match inner.split_once(',') {
        Some((min, max)) => (min, Some(max)),
        None => (inner.as_str(), None),
    };
    let digits = |s: &str| s.chars().all(|c| c.is_ascii_digit());
    if !digits(min) || !max.is_none_or(digits) || (min.is_empty() && max.is_none_or(str::is_empty)) {
        return None;
    }
    let min = if min.is_empty() { "0" } else { min };
    let text = match max {
        None => format!("{{{min}}}"),
        Some(max) => format!("{{{min},{max}}}"),
    };
    Some((text, end + 1))
}

/// An escape after its backslash (`e`, then `rest`), inside a class or not; returns how many
/// characters of `rest` it used.
fn escape(e: char, rest: &[char], in_class: bool, out: &mut String) -> Parsed<usize> {
    match e {
        'd' | 'D' | 'w' | 'W' | 's' | 'S' | 'n' | 't' | 'r' | 'f' | 'a' => {
            out.push('\\');
            out.push(e);
        }
        'b' | 'B' | 'A' | 'z' if !in_class => {
            out.push('\\');
            out.push(e);
        }
        'Z' if !in_class => out.push_str("(?m:$)"),
        'e' => out.push_str(r"\x1B"),
        'v' | 'h' => {
            // Perl's vertical and horizontal whitespace, on bytes.
            let set = if e == 'v' { r"\x0A-\x0D\x85" } else { r"\x09\x20\xA0" };
            if in_class {
                out.push_str(set);
            } else {
                out.push('[');
                out.push_str(set);
                out.push(']');
            }
        }
        '0' => {
            let digits: String = rest.iter().take(2).take_while(|c| ('0'..='7').contains(*c)).collect();
            let value = u8::from_str_radix(&format!("0{digits}"), 8).unwrap_or(0);
            out.push_str(&format!("\\x{value:02X}"));
            return Ok(digits.len());
        }
        'x' => {
            let (b, used) = hex_escape(rest)?;
            out.push_str(&format!("\\x{b:02X}"));
            return Ok(used);
        }
        '1'..='9' => {
            return Err(format!("the backreference \\{e} is not supported: the regex engine does not backtrack"));
        }
        'Q' | 'E' | 'K' | 'G' | 'R' | 'X' | 'C' | 'N' | 'g' | 'k' | 'l' | 'u' | 'L' | 'U' | 'c' | 'o' | 'p' | 'P'
        | 'V' | 'H' => return Err(format!("\\{e} is not supported")),
        e if e.is_ascii_alphanumeric() => return Err(format!("\\{e} is not a Perl escape imgforge knows")),
        // An escaped space is a space even under /x.
        e if e.is_ascii_whitespace() || !e.is_ascii() => byte_escapes(e, out),
        e => out.push_str(&regex::escape(&e.to_string())),
    }
    Ok(0)
}

/// A bracketed class after its `[`, with Perl's literal readings made explicit; returns how
/// many characters of `rest` it used (through the closing `]`).
fn class(rest: &[char], out: &mut String) -> Parsed<usize> {
    let mut i = 0;
    out.push('[');
    if rest.first() == Some(&'^') {
        out.push('^');
        i += 1;
    }
    if rest.get(i) == Some(&']') {
        out.push_str(r"\]");
        i += 1;
    }
    while let Some(&c) = rest.get(i) {
        i += 1;
        match c {
            ']' => {
                out.push(']');
                return Ok(i);
            }
            '\\' => {
                let Some(&e) = rest.get(i) else { break };
                i += 1;
                i += escape(e, &rest[i..], true, out)?;
            }
            '[' if rest.get(i) == Some(&':') => {
                let end = rest[i..].windows(2).position(|w| w == [':', ']']).ok_or("an unterminated [: class")?;
                out.push('[');
                out.extend(&rest[i..i + end + 2]);
                i += end + 2;
            }
            '$' if rest.get(i).is_some_and(|n| is_word(*n) || *n == '{') => {
                return Err(format!(
                    "${} would interpolate a Perl variable (write \\$ for a dollar sign)",
                    rest_word(&rest[i..])
                ));
            }
            '@' if rest.get(i).is_some_and(|n| is_word(*n) || *n == '{') => {
                return Err(format!(
                    "@{} would interpolate a Perl array (write \\@ for an at sign)",
                    rest_word(&rest[i..])
                ));
            }
            // Literal in Perl, operators or nesting in the regex crate's classes.
            '[' | '&' | '~' | '$' | '#' => {
                out.push('\\');
                out.push(c);
            }
            '-' if rest.get(i) == Some(&'-') => out.push_str(r"\-"),
            c if c.is_whitespace() || !c.is_ascii() => byte_escapes(c, out),
            c => out.push(c),
        }
    }
    Err("an unterminated [ class".into())
}

#[cfg(test)]
mod tests;
