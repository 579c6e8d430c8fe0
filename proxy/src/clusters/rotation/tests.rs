use super::*;

fn at(t: &str) -> Timestamp {
    t.parse().unwrap()
}

fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The annotations after a rotation was written.
fn after(before: &BTreeMap<String, String>, r: &Rotation) -> BTreeMap<String, String> {
    let mut out = before.clone();
    for (k, v) in &r.annotations {
        match v.as_str() {
            Some(v) => out.insert(k.clone(), v.to_string()),
            None => out.remove(k),
        };
    }
    out
}

const NOW: &str = "2026-12-03T18:00:00Z";

#[test]
fn nothing_to_do_without_a_request() {
    assert!(rotation(&annotations(&[]), "old", at(NOW), || "new".into()).is_none());
    let empty = annotations(&[(ROTATE, "")]);
    assert!(rotation(&empty, "old", at(NOW), || "new".into()).is_none());
}

#[test]
fn a_request_rotates_once_and_records_only_fingerprints() {
    let asked = annotations(&[(ROTATE, "2026-12-03")]);
    let r = rotation(&asked, "old", at(NOW), || "new".into())
        .unwrap()
        .unwrap();
    assert_eq!(r.token, "new");
    assert_eq!(r.until, Some(at("2026-12-03T18:10:00Z")), "default 10m");
    let written = after(&asked, &r);
    assert_eq!(written[ROTATED], "2026-12-03");
    assert_eq!(written[TOKEN_SHA256], fingerprint("new"));
    assert_eq!(written[PREVIOUS], fingerprint("old"));
    assert_eq!(written[PREVIOUS_UNTIL], "2026-12-03T18:10:00Z");
    for value in written.values() {
        assert!(value != "old" && value != "new", "a token was written");
    }
    // The same value does not rotate again; a new one does.
    assert!(rotation(&written, "new", at(NOW), || "newer".into()).is_none());
    let mut again = written.clone();
    again.insert(ROTATE.into(), "2026-12-04".into());
    let r2 = rotation(&again, "new", at(NOW), || "newer".into())
        .unwrap()
        .unwrap();
    assert_eq!(after(&again, &r2)[PREVIOUS], fingerprint("new"));
}

#[test]
fn the_grace_period_is_a_go_duration() {
    let asked = annotations(&[(ROTATE, "x"), (GRACE, "1h30m")]);
    let r = rotation(&asked, "old", at(NOW), || "new".into())
        .unwrap()
        .unwrap();
    assert_eq!(r.until, Some(at("2026-12-03T19:30:00Z")));
    let bad = annotations(&[(ROTATE, "x"), (GRACE, "soon")]);
    let e = rotation(&bad, "old", at(NOW), || "new".into())
        .unwrap()
        .unwrap_err();
    assert!(e.contains(GRACE) && e.contains("Go duration"), "{e}");
}

#[test]
fn without_a_token_there_is_no_previous_one() {
    let asked = annotations(&[(ROTATE, "x"), (PREVIOUS, "sha256:aa")]);
    let r = rotation(&asked, "", at(NOW), || "new".into())
        .unwrap()
        .unwrap();
    assert_eq!(r.until, None);
    let written = after(&asked, &r);
    assert!(!written.contains_key(PREVIOUS));
    assert!(grace(&written, "new", at(NOW)).is_none());
}

#[test]
fn the_previous_token_works_during_the_grace_only() {
    let asked = annotations(&[(ROTATE, "x"), (GRACE, "5s")]);
    let r = rotation(&asked, "old", at(NOW), || "new".into())
        .unwrap()
        .unwrap();
    let written = after(&asked, &r);
    let g = grace(&written, "new", at(NOW)).unwrap();
    assert!(g.accepts("old", at(NOW)));
    assert!(!g.accepts("other", at(NOW)));
    assert_eq!(g.until, at("2026-12-03T18:00:05Z"));
    // Over at the end.
    assert!(grace(&written, "new", at("2026-12-03T18:00:05Z")).is_none());
}

#[test]
fn a_token_written_by_hand_revokes_without_grace() {
    let asked = annotations(&[(ROTATE, "x")]);
    let r = rotation(&asked, "old", at(NOW), || "new".into())
        .unwrap()
        .unwrap();
    let written = after(&asked, &r);
    // spec.connection.token edited directly: the grace is not its own.
    assert!(grace(&written, "by-hand", at(NOW)).is_none());
    // Broken annotations grant nothing.
    let mut broken = written.clone();
    broken.insert(PREVIOUS_UNTIL.into(), "tomorrow".into());
    assert!(grace(&broken, "new", at(NOW)).is_none());
}
