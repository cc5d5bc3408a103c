use super::*;

fn edit(expr: &str, input: &[u8]) -> Vec<u8> {
    Program::parse(expr).unwrap_or_else(|e| panic!("{expr}: {e}")).apply(input).unwrap()
}

fn edit_text(expr: &str, input: &str) -> String {
    String::from_utf8(edit(expr, input.as_bytes())).unwrap()
}

/// Expressions virt-customize users write (virt-edit's manual among them), and what they do.
#[test]
fn accepted_expressions_do_what_perl_does() {
    let hosts = "127.0.0.1 localhost\n127.0.1.1 old\n# comment\n";
    let passwd =
        "root:x:0:0::/root:/bin/sh\napache:x:48:48::/var/www:/sbin/nologin\nalice:x:1000:1000::/home/a:/bin/sh\n";
    let table: &[(&str, &str, &str)] = &[
        // virt-edit's own examples.
        ("s/foo/bar/", "foo foo\nfoo\n", "bar foo\nbar\n"),
        ("s/^root:.*?:/root::/", passwd, &passwd.replacen("root:x:", "root::", 1)),
        ("$_ = \"\" if /^apache:/", passwd, &passwd.replace("apache:x:48:48::/var/www:/sbin/nologin\n", "")),
        ("s/some text(\\r?\\n)?$/other$1/", "a some text\r\nsome text", "a other\r\nother"),
        // g versus the first match only; i.
        ("s/o/0/g", "foo boo\n", "f00 b00\n"),
        ("s/O/0/i", "foo\n", "f0o\n"),
        ("s/O/0/gi", "FOO\n", "F00\n"),
        // Other delimiters, escaped delimiters, a bracketed pair with its own second delimiter.
        ("s|/usr/local|/opt|", "/usr/local/bin\n", "/opt/bin\n"),
        ("s{a}{b}g", "aaa\n", "bbb\n"),
        ("s{a} [b]", "aa\n", "ba\n"),
        ("s<(x)>{[$1]}", "x\n", "[x]\n"),
        ("s/\\/etc\\//\\/srv\\//", "/etc/x\n", "/srv/x\n"),
        ("s#a#b#", "a\n", "b\n"),
        ("s,old,new,", "old\n", "new\n"),
        ("s!x!y!g", "xx\n", "yy\n"),
        // Replacement variables and escapes.
        ("s/(\\w+) (\\w+)/$2 $1/", "hello world\n", "world hello\n"),
        ("s/(\\w+)/${1}x/", "ab\n", "abx\n"),
        ("s/(\\w+)/\\1\\1/", "ab\n", "abab\n"),
        ("s/b+/[$&]/", "abbc\n", "a[bb]c\n"),
        ("s/,/\\t/g", "a,b\n", "a\tb\n"),
        ("s/,/\\n/", "a,b\n", "a\nb\n"),
        ("s/x/\\\\/", "x\n", "\\\n"),
        ("s/x/\\$HOME \\@/", "x\n", "$HOME @\n"),
        ("s/x/a@/", "x\n", "a@\n"),
        ("s/(a)|b/<$1>/g", "ab\n", "<a><>\n"),
        // ^ and $ on one line: $ before the final newline, and at the very end with /g.
        ("s/$/!/", "a\nb", "a!\nb!"),
        ("s/$/!/g", "a\n", "a!\n!"),
        ("s/^/# /", "a\nb\n", "# a\n# b\n"),
        ("s/^/# /mg", "a\n", "# a\n"),
        ("s/a$/A/m", "aa\n", "aA\n"),
        // /s lets . eat the newline (joining lines); without it, it does not.
        ("s/b./X/s", "ab\ncd\n", "aXcd\n"),
        ("s/b./X/", "ab\ncd\n", "ab\ncd\n"),
        ("s/\\n//", "a\nb\nc\n", "abc"),
        // /x ignores whitespace and comments; an escaped space stays.
        ("s/ a \\  b # comment\n/X/x", "a b\n", "X\n"),
        ("s/[ ]/_/gx", "a b\n", "a_b\n"),
        // Perl's literal readings the regex crate would not share.
        ("s/a{b}/X/", "a{b}\n", "X\n"),
        ("s/a{2}/X/", "aaa\n", "Xa\n"),
        ("s/[[]/X/", "[\n", "X\n"),
        ("s/[a&&b]/X/g", "&b\n", "XX\n"),
        ("s/[]]/X/", "]\n", "X\n"),
        ("s/[[:digit:]]+/N/", "ab12\n", "abN\n"),
        ("s/\\Z/!/", "a\n", "a!\n"),
        ("s/(?#note)a/b/", "a\n", "b\n"),
        ("s/(?<w>o+)/0/", "foo\n", "f0\n"),
        ("s/(?i)A/b/", "a\n", "b\n"),
        ("s/(?i-s:A)/b/", "a\n", "b\n"),
        ("s/\\x{41}/b/", "A\n", "b\n"),
        // Empty matches with /g, as Perl steps past them.
        ("s/x*/-/g", "abc\n", "-a-b-c-\n-"),
        // Replacing and deleting lines.
        ("$_ = \"new\\n\" if /old/", hosts, "127.0.0.1 localhost\nnew\n# comment\n"),
        ("$_ = '' if /^#/", hosts, "127.0.0.1 localhost\n127.0.1.1 old\n"),
        ("$_ = ''", hosts, ""),
        ("$_ = \"x\" unless /^127/", hosts, "127.0.0.1 localhost\n127.0.1.1 old\nx"),
        ("$_ = \"# $_\" if !/^#/", "a\n#b\n", "# a\n#b\n"),
        ("$_ = \"new\\n\" . $_ if /^b/", "a\nb\n", "a\nnew\nb\n"),
        ("$_ .= \"after\\n\" if m{^a}", "a\nb\n", "a\nafter\nb\n"),
        ("$_ = 'no $_ or \\n here' . \"\\n\"", "a\n", "no $_ or \\n here\n"),
        ("$_ = \"${_}\"", "a\n", "a\n"),
        // Conditions, statements joined by ;.
        ("s/a/b/ if /^x/", "xa\nya\n", "xb\nya\n"),
        ("s/a/b/ unless /^x/", "xa\nya\n", "xa\nyb\n"),
        ("s/a/b/ if /^X/i;", "xa\n", "xb\n"),
        ("s/a/b/; s/b/c/", "a\n", "c\n"),
        ("$_ =~ s/a/b/", "a\n", "b\n"),
        // tr/// and y///.
        ("tr/a-z/A-Z/", "abc-1\n", "ABC-1\n"),
        ("y/abc/x/", "aabbcc\n", "xxxxxx\n"),
        ("tr{a\\-}{_}", "a-b\n", "__b\n"),
        ("tr/a//", "aaa\n", "aaa\n"),
        // Non-ASCII: the pattern's character is its UTF-8 bytes.
        ("s/é/e/g", "café é\n", "cafe e\n"),
    ];
    for (expr, input, want) in table {
        assert_eq!(edit_text(expr, input), *want, "{expr:?} on {input:?}");
    }
}

/// What virt-customize would hand to Perl but imgforge refuses: each refusal names the
/// expression, what in it is not supported, and lists the supported forms.
#[test]
fn refused_expressions_say_why() {
    let table: &[(&str, &str)] = &[
        ("", "empty"),
        ("   ", "empty"),
        ("print", "not one of the supported forms"),
        ("chomp; $_ .= \"x\\n\"", "not one of the supported forms"),
        ("s/a/b/e", "e flag"),
        ("s/a/b/r", "flag 'r'"),
        ("s/a/b/o", "flag 'o'"),
        ("s/a/b", "no closing '/'"),
        ("s{a}", "delimiter"),
        ("s'a'b'", "' delimiter"),
        ("s/a/$x/", "$x would interpolate"),
        ("s/a/$/", "final $"),
        ("s/a/@x/", "@x would interpolate"),
        ("s/a/\\u$1/", "\\u"),
        ("s/a/$1/", "group 1"),
        ("s/(a)/$2/", "group 2"),
        ("s/$var/x/", "$var would interpolate"),
        ("s/a@b/x/", "@b would interpolate"),
        ("s/(a)\\1/x/", "backreference"),
        ("s/\\x{41/x/", "unterminated \\x{"),
        ("s/a/\\x{41/", "unterminated \\x{"),
        ("s/(?u)a/x/", "inline flag 'u'"),
        ("s/(?U:a+)/x/", "inline flag 'U'"),
        ("s/(?^i:a)/x/", "inline flag '^'"),
        ("s/a(?=b)/x/", "look-ahead"),
        ("s/a(?!b)/x/", "look-ahead"),
        ("s/(?<=a)b/x/", "look-behind"),
        ("s/(?<!a)b/x/", "look-behind"),
        ("s/(?>a)/x/", "atomic"),
        ("s/a++/x/", "possessive"),
        ("s/\\Qa.b\\E/x/", "\\Q"),
        ("s/\\K//", "\\K"),
        ("s/\\j/x/", "\\j"),
        ("s/[a/x/", "unterminated ["),
        ("s/(a/x/", "regex engine"),
        ("s//x/", "empty pattern"),
        ("s/a/b/ if $lineno == 1", "condition"),
        ("s/a/b/ if /x/g", "flag 'g'"),
        ("s/a/b/ s/c/d/", "unexpected"),
        ("$_ = $x", "quoted string"),
        ("$_ = \"$x\"", "$x would interpolate"),
        ("$_ = \"$1\"", "$1 would interpolate"),
        ("$_ == 1", "expected"),
        ("$_ =~ m/a/", "only s/// and tr///"),
        ("tr/a-z/A-Z/d", "flag 'd'"),
        ("tr/z-a/x/", "range"),
        ("system('rm -rf /')", "not one of the supported forms"),
        ("`reboot`", "not one of the supported forms"),
        ("s/a/b/;;", "not one of the supported forms"),
    ];
    for (expr, want) in table {
        let err = Program::parse(expr).expect_err(expr);
        let text = err.to_string();
        assert_eq!(err.expr, *expr);
        assert!(text.contains(&format!("{expr:?}")) && text.contains(SUPPORTED_FORMS), "{expr}: {text}");
        assert!(err.reason.contains(want), "{expr:?}: wanted {want:?} in {:?}", err.reason);
    }
}

#[test]
fn lines_are_edited_one_at_a_time_with_their_newline() {
    // Perl sees each line apart: ^ never matches after a newline, a match never spans lines.
    assert_eq!(edit_text("s/a\\nb/X/", "a\nb\n"), "a\nb\n");
    assert_eq!(edit_text("s/^b/X/m", "a\nb\n"), "a\nX\n");
    // A line that lost its newline is joined with the next; the last line may have none.
    assert_eq!(edit_text("s/\\n// if /^a/", "a\nb\nc"), "ab\nc");
    assert_eq!(edit_text("s/c/C/", "a\nc"), "a\nC");
    // DOS line endings are kept unless the expression touches them.
    assert_eq!(edit_text("s/b/B/", "a\r\nb\r\n"), "a\r\nB\r\n");
    assert_eq!(edit("s/x/y/", b""), b"");
    assert_eq!(edit_text("s/a/b/", "\n\n"), "\n\n");
}

#[test]
fn bytes_that_are_not_utf8_are_edited_bytewise() {
    let input = b"\xff\xfeabc\n\xc3(\n";
    assert_eq!(edit("s/abc/xyz/", input), b"\xff\xfexyz\n\xc3(\n");
    assert_eq!(edit("s/./_/", input), b"_\xfeabc\n_(\n", ". is one byte");
    assert_eq!(edit("s/\\xff/F/", input), b"F\xfeabc\n\xc3(\n");
    assert_eq!(edit("s/[\\x80-\\xff]+//g", input), b"abc\n(\n");
    assert_eq!(edit("$_ = '' if /\\xc3/", input), b"\xff\xfeabc\n");
    assert_eq!(edit("s/(\\W+)a/$1-/", input), b"\xff\xfe-bc\n\xc3(\n");
    // Perl's \w and /i are ASCII-only on bytes: é's bytes are no word characters.
    assert_eq!(edit_text("s/\\w+/W/", "é1\n"), "éW\n");
    assert_eq!(edit_text("s/É/E/i", "é\n"), "é\n");
    assert_eq!(edit("s/caf./X/", "café\n".as_bytes()), b"X\xa9\n", ". takes é's first byte only");
}

#[test]
fn substitutions_replace_the_first_match_or_all_with_g() {
    assert_eq!(edit_text("s/a/b/", "aaa\naaa\n"), "baa\nbaa\n");
    assert_eq!(edit_text("s/a/b/g", "aaa\naaa\n"), "bbb\nbbb\n");
    assert_eq!(edit_text("s/A/b/", "aaa\n"), "aaa\n");
    assert_eq!(edit_text("s/A/b/ig", "aAa\n"), "bbb\n");
    assert_eq!(edit_text("s/(x)?a/[$1]/g", "xaa\n"), "[x][]\n");
}

/// The same expressions through the real Perl that virt-customize runs (`edit_file_perl`'s
/// loop), when this machine has one: imgforge must write the same bytes.
#[test]
fn the_same_bytes_as_perl() {
    if std::process::Command::new("perl").arg("-e1").status().map(|s| !s.success()).unwrap_or(true) {
        eprintln!("no perl here: the comparison with Perl is skipped");
        return;
    }
    let input: &[u8] = b"root:x:0:0::/root:/bin/sh\n  indented\tline \r\n\xff\xfe caf\xc3\xa9 {a} [b] a.b\n\naaa\nlast";
    let exprs = [
        "s/o/0/g",
        "s/^root:.*?:/root::/",
        "s/$/!/g",
        "s/^/# /mg",
        "s/\\s+$//",
        "s/\\s+/ /g",
        "s/(\\w+):(\\w+)/$2:$1/",
        "s/a*/-/g",
        "s/./_/g",
        "s/\\W/_/g",
        "s/[[:upper:][:punct:]]/P/g",
        "s/\\n//",
        "s/a.\\n?/X/s",
        "s/\\{a\\}|\\[b]/B/g",
        "s/a{2,}/A/",
        "s/a{b}/A/; s/[{]/(/",
        "s/caf\\xc3\\xa9/cafe/",
        "s/\\xff\\xfe/BOM/",
        "s/ (\\S+) \\s* \\r/<$1>/x",
        "s/\\h+/_/g; s/\\v//",
        "s/\\Z/Z/g",
        "s/b\\z/B/",
        "$_ = '' if /^\\s*$/",
        "$_ = \"# $_\" unless /^root/",
        "$_ .= \"--\\n\" if m{^a+$}",
        "tr/a-z/A-Z/",
        "y/a-c/x/",
        "s|/root|/home/root|; s,/bin/sh,/bin/bash,",
        "s/(a)|(b)/[$1$2]/g",
        "s/e/\\x41\\t\\e/g",
        "s/^\\s+|\\s+$//g",
        "s/\\d+/<$&>/g",
        "s/(?i)ROOT/R/",
        "s/[^a-z\\n]//g",
        "s/\\b/|/g",
        "s/(o)(o)?/${2}_$1/g",
    ];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("in");
    std::fs::write(&path, input).unwrap();
    for expr in exprs {
        // edit_file_perl's loop, the expression passed through the environment as it does.
        let out = std::process::Command::new("perl")
            .arg("-e")
            .arg("$lineno = 0; $expr = $ENV{virt_edit_expr}; while (<STDIN>) { $lineno++; eval $expr; die if $@; print STDOUT $_ or die; } close STDOUT or die;")
            .env("virt_edit_expr", expr)
            .stdin(std::fs::File::open(&path).unwrap())
            .output()
            .unwrap();
        assert!(out.status.success(), "{expr}: perl failed: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8_lossy(&edit(expr, input)), String::from_utf8_lossy(&out.stdout), "{expr:?}");
        assert_eq!(edit(expr, input), out.stdout, "{expr:?}");
    }
}

/// A line is bounded in and out: a hostile image's one-line file of gigabytes, or an
/// expression that doubles a line forty times, is a clean error, not the helper's memory.
#[test]
fn lines_longer_than_the_limit_are_refused() {
    let doubling = vec!["$_ .= $_"; 40].join("; ");
    let program = Program::parse(&doubling).unwrap();
    assert_eq!(program.apply_line(b"ab\n"), Err(LineTooLong { limit: MAX_LINE_BYTES }));
    let (max, too_long) = (16, Err(LineTooLong { limit: 16 }));
    // (expression, line, whether it fits in 16 bytes)
    let cases: &[(&str, &[u8], bool)] = &[
        ("s/a/b/", b"aaaaaaaaaaaaaaa\n", true),
        ("s/a/b/", b"aaaaaaaaaaaaaaaa\n", false),
        ("s/a/bb/g", b"aaaaaaa\n", true),
        ("s/a/bb/g", b"aaaaaaaa\n", false),
        ("s/(a+)/$1$1$1/", b"aaaaa\n", true),
        ("s/(a+)/$1$1$1/", b"aaaaaa\n", false),
        ("s/x*/-/g", b"abcdef\n", true),
        ("s/x*/-/g", b"abcdefg\n", false),
        ("$_ = \"$_$_\"", b"1234567\n", true),
        ("$_ = \"$_$_\"", b"12345678\n", false),
        ("$_ .= '12345678'", b"1234567\n", true),
        ("$_ .= '123456789'", b"1234567\n", false),
        ("tr/a-z/A-Z/", b"abcdefghijklmno\n", true),
    ];
    for (expr, line, fits) in cases {
        let got = Program::parse(expr).unwrap().apply_line_within(line, max);
        assert_eq!(got.is_ok(), *fits, "{expr} on {:?}: {got:?}", String::from_utf8_lossy(line));
        if !fits {
            assert_eq!(got, too_long);
        }
    }
}
