use super::*;

fn caller() -> Caller {
    Caller {
        user: "kubeconfig of alpha".into(),
        groups: Vec::new(),
        cn: Some("tower:alpha".into()),
        ..Caller::named("")
    }
}

#[test]
fn one_json_object_with_fixed_fields() {
    let uri: hyper::Uri = "/api/v1/namespaces?watch=true&resourceVersion=7"
        .parse()
        .unwrap();
    let mut record = Record::http("port", "alpha", caller(), &uri, "GET");
    record.status = 200;
    record.bytes_out = 42;
    let line = String::from_utf8(record.line()).unwrap();
    assert!(
        line.ends_with("}\n") && line.matches('\n').count() == 1,
        "{line}"
    );
    let value: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(value["door"], "port");
    assert_eq!(value["cluster"], "alpha");
    assert_eq!(value["caller"]["user"], "kubeconfig of alpha");
    assert_eq!(value["caller"]["cn"], "tower:alpha");
    assert!(value["caller"].get("groups").is_none());
    assert_eq!(value["verb"], "watch");
    assert_eq!(value["method"], "GET");
    assert_eq!(value["path"], "/api/v1/namespaces");
    assert_eq!(value["status"], 200);
    assert_eq!(value["bytes_in"], 0);
    assert_eq!(value["bytes_out"], 42);
    assert!(value.get("target").is_none() && value.get("reason").is_none());
    assert!(value.get("source").is_none());
    let from =
        Record::http("port", "alpha", caller(), &uri, "GET").from(Some([10, 1, 2, 3].into()));
    let from: serde_json::Value =
        serde_json::from_str(&String::from_utf8(from.line()).unwrap()).unwrap();
    assert_eq!(from["source"], "10.1.2.3");
    let time = value["time"].as_str().unwrap();
    assert!(time.parse::<jiff::Timestamp>().is_ok(), "{time}");
    assert!(
        time.ends_with('Z') && time.len() == "2026-12-03T12:00:00.123Z".len(),
        "{time}"
    );
}

#[test]
fn no_header_query_or_body_reaches_a_line() {
    let req = hyper::Request::post("/api/v1/namespaces?token=sekrit-query")
        .header("authorization", "Bearer sekrit-token")
        .body("{\"data\":\"sekrit-body\"}")
        .unwrap();
    let mut record = Record::http("port", "alpha", caller(), req.uri(), req.method().as_str());
    record.status = 201;
    let line = String::from_utf8(record.line()).unwrap();
    for secret in ["sekrit", "Bearer", "token"] {
        assert!(!line.contains(secret), "{secret} in {line}");
    }
    assert!(line.contains("\"verb\":\"create\""), "{line}");
}

#[tokio::test]
async fn lines_are_appended_to_a_private_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    std::fs::write(&path, "earlier\n").unwrap();
    let metrics = Arc::new(Metrics::new());
    let (audit, writer) = Audit::start(Destination::File(path.clone()).open().unwrap(), metrics);
    for status in [200, 403] {
        let mut pending = audit
            .begin(|| Record::new("unix", "alpha", Caller::named("socket of alpha"), "connect"));
        pending.bytes_in.fetch_add(5, Ordering::Relaxed);
        let record = pending.record().unwrap();
        record.status = status;
        record.target = Some("10.0.0.1:22".into());
    }
    drop(audit);
    writer.await.unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert_eq!(lines[0], "earlier");
    let second: serde_json::Value = serde_json::from_str(lines[2]).unwrap();
    assert_eq!(second["status"], 403);
    assert_eq!(second["bytes_in"], 5);
    assert_eq!(second["target"], "10.0.0.1:22");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::remove_file(&path);
        let (audit, writer) = Audit::start(
            Destination::File(path.clone()).open().unwrap(),
            Arc::new(Metrics::new()),
        );
        drop(audit);
        writer.await.unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}

#[test]
fn off_builds_and_writes_nothing() {
    let mut pending = Audit::Off.begin(|| panic!("built a record while off"));
    assert!(pending.record().is_none());
}

#[tokio::test]
async fn a_full_queue_drops_and_counts() {
    let metrics = Arc::new(Metrics::new());
    // A writer that never makes progress: a duplex nobody reads.
    let (blocked, _reader) = tokio::io::duplex(1);
    let (audit, _writer) = Audit::to_writer(Box::new(blocked), metrics.clone());
    for _ in 0..QUEUE + 200 {
        audit.log(Record::new(
            "hub",
            "alpha",
            Caller::named("agent of alpha"),
            "hub",
        ));
    }
    assert!(
        metrics.audit_dropped.get() >= 100,
        "{}",
        metrics.audit_dropped.get()
    );
}

#[test]
fn destinations() {
    assert_eq!(Destination::parse("-"), Ok(Destination::Stdout));
    assert_eq!(
        Destination::parse("/var/log/tower/audit.log"),
        Ok(Destination::File("/var/log/tower/audit.log".into()))
    );
    assert!(Destination::parse("").is_err());
    let err = Destination::parse("/nonexistent/dir/audit.log")
        .unwrap()
        .open()
        .err()
        .unwrap();
    assert!(
        err.to_string()
            .starts_with("--audit-log /nonexistent/dir/audit.log: cannot open"),
        "{err}"
    );
}

#[tokio::test]
async fn a_request_dropped_unanswered_is_499() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let (audit, writer) = Audit::start(
        Destination::File(path.clone()).open().unwrap(),
        Arc::new(Metrics::new()),
    );
    drop(audit.begin(|| Record::new("port", "alpha", caller(), "watch")));
    drop(audit);
    writer.await.unwrap();
    let line: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(&path).unwrap().trim()).unwrap();
    assert_eq!(line["status"], CLIENT_LEFT);
    assert_eq!(line["reason"], "the client left before the answer");
}

#[tokio::test]
async fn closing_writes_what_is_queued_though_handles_remain() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let metrics = Arc::new(Metrics::new());
    let (audit, writer) = Audit::start(Destination::File(path.clone()).open().unwrap(), metrics);
    // A task the exit would drop still holds a handle.
    let held = audit.clone();
    for n in 0..100 {
        audit.log(Record::new(
            "port",
            "alpha",
            Caller::named(format!("u{n}")),
            "get",
        ));
    }
    audit.close();
    tokio::time::timeout(std::time::Duration::from_secs(30), writer)
        .await
        .expect("the writer ends once closed, though a handle remains")
        .unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text.lines().count(), 100, "{text}");
    assert!(text.contains("\"u99\""), "{text}");
    drop(held);
}

#[tokio::test]
async fn counting_counts_vectored_writes_and_passes_them_on() {
    use std::io::IoSlice;
    use tokio::io::AsyncWriteExt;
    let mut counting = Counting::new(Vec::<u8>::new());
    assert!(
        counting.is_write_vectored(),
        "a copy gathers packets into one write"
    );
    let n = counting
        .write_vectored(&[IoSlice::new(b"ab"), IoSlice::new(b"cde")])
        .await
        .expect("a Vec takes every byte");
    assert_eq!((n, counting.written), (5, 5));
    assert_eq!(counting.inner, b"abcde");
}
