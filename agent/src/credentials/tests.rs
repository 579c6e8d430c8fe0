use super::*;
use base64::Engine as _;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

fn write_kubeconfig(dir: &Path, cluster: &str, user: &str) -> PathBuf {
    let text = format!(
        "apiVersion: v1\nkind: Config\ncurrent-context: member\n\
         contexts:\n- name: other\n  context: {{cluster: other, user: other}}\n\
         - name: member\n  context: {{cluster: c, user: u}}\n\
         clusters:\n- name: c\n  cluster:\n{cluster}\n\
         users:\n- name: u\n  user:\n{user}\n"
    );
    let path = dir.join("config");
    std::fs::write(&path, text).unwrap();
    path
}

fn load(path: PathBuf) -> anyhow::Result<Credentials> {
    CredentialSource::Kubeconfig { path }.load()
}

#[test]
fn kubeconfig_with_inline_cert_data() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = format!(
        "    server: https://10.0.0.1:6443\n    certificate-authority-data: {}",
        B64.encode("CA PEM")
    );
    let user = format!(
        "    client-certificate-data: {}\n    client-key-data: {}",
        B64.encode("CERT PEM"),
        B64.encode("KEY PEM")
    );
    let creds = load(write_kubeconfig(dir.path(), &cluster, &user)).unwrap();
    assert_eq!(creds.server.as_deref(), Some("10.0.0.1:6443"));
    assert_eq!(creds.ca_data, b"CA PEM");
    assert_eq!(creds.cert_data, b"CERT PEM");
    assert_eq!(creds.key_data, b"KEY PEM");
    assert!(creds.bearer_token.is_empty());
    assert_eq!(creds.kinds(), "ca,client-certificate");
    assert!(!format!("{creds:?}").contains("PEM"));
}

#[test]
fn kubeconfig_files_are_relative_to_the_kubeconfig() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("pki")).unwrap();
    std::fs::write(dir.path().join("pki/ca.crt"), "CA FILE").unwrap();
    std::fs::write(dir.path().join("pki/tls.crt"), "CERT FILE").unwrap();
    std::fs::write(dir.path().join("pki/tls.key"), "KEY FILE").unwrap();
    std::fs::write(dir.path().join("token"), "  file-token\n").unwrap();
    let cluster = "    server: https://[fd00::1]\n    certificate-authority: pki/ca.crt";
    let user = "    client-certificate: pki/tls.crt\n    client-key: pki/tls.key\n    \
                token: stale-inline\n    tokenFile: token";
    let path = write_kubeconfig(dir.path(), cluster, user);
    let creds = load(path.clone()).unwrap();
    assert_eq!(creds.server.as_deref(), Some("[fd00::1]:443"));
    assert_eq!(creds.ca_data, b"CA FILE");
    assert_eq!(creds.cert_data, b"CERT FILE");
    assert_eq!(creds.key_data, b"KEY FILE");
    assert_eq!(creds.bearer_token, b"file-token");

    // A rotated token file is seen on the next load.
    std::fs::write(dir.path().join("token"), "rotated").unwrap();
    assert_eq!(load(path).unwrap().bearer_token, b"rotated");
}

#[test]
fn kubeconfig_inline_token() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_kubeconfig(
        dir.path(),
        "    server: https://api.example:443",
        "    token: abc",
    );
    let creds = load(path).unwrap();
    assert_eq!(creds.server.as_deref(), Some("api.example:443"));
    assert_eq!(creds.bearer_token, b"abc");
    assert!(creds.ca_data.is_empty());
}

#[test]
fn exec_and_other_dynamic_credentials_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let exec = "    exec:\n      apiVersion: client.authentication.k8s.io/v1\n      command: aws\n      args: [eks, get-token]";
    let e = format!(
        "{:#}",
        load(write_kubeconfig(dir.path(), "    server: https://a", exec)).unwrap_err()
    );
    assert!(
        e.contains("exec plugin \"aws\"") && e.contains("not supported"),
        "{e}"
    );
    assert!(
        e.contains("client certificate") && e.contains("tokenFile"),
        "{e}"
    );

    let provider = "    auth-provider:\n      name: oidc\n      config: {}";
    let e = format!(
        "{:#}",
        load(write_kubeconfig(
            dir.path(),
            "    server: https://a",
            provider
        ))
        .unwrap_err()
    );
    assert!(e.contains("auth provider \"oidc\""), "{e}");

    let basic = "    username: admin\n    password: secret";
    let e = format!(
        "{:#}",
        load(write_kubeconfig(dir.path(), "    server: https://a", basic)).unwrap_err()
    );
    assert!(e.contains("basic auth") && !e.contains("secret"), "{e}");
}

#[test]
fn kubeconfig_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let e = format!(
        "{:#}",
        load(write_kubeconfig(
            dir.path(),
            "    server: http://a:8080",
            "    token: t"
        ))
        .unwrap_err()
    );
    assert!(e.contains("https://"), "{e}");
    let e = format!(
        "{:#}",
        load(write_kubeconfig(
            dir.path(),
            "    server: https://rancher/k8s/clusters/c-1",
            "    token: t"
        ))
        .unwrap_err()
    );
    assert!(e.contains("has a path"), "{e}");
    let e = format!(
        "{:#}",
        load(write_kubeconfig(
            dir.path(),
            "    server: https://a",
            "    client-certificate-data: Q0VSVA=="
        ))
        .unwrap_err()
    );
    assert!(e.contains("without its key"), "{e}");
    let e = format!(
        "{:#}",
        load(write_kubeconfig(
            dir.path(),
            "    server: https://a",
            "    tokenFile: missing"
        ))
        .unwrap_err()
    );
    assert!(e.contains("cannot read") && e.contains("missing"), "{e}");
    let e = format!("{:#}", load(dir.path().join("nope")).unwrap_err());
    assert!(e.contains("--kubeconfig"), "{e}");
}

#[test]
fn service_account_directory() {
    let dir = tempfile::tempdir().unwrap();
    let env_dir = dir.path().to_str().unwrap().to_string();
    let env = move |name: &str| (name == SERVICE_ACCOUNT_DIR_ENV).then(|| env_dir.clone());
    // No token yet: not in a pod.
    assert_eq!(CredentialSource::detect(None, &env), CredentialSource::None);
    std::fs::write(dir.path().join("token"), "sa-token\n").unwrap();
    std::fs::write(dir.path().join("ca.crt"), "SA CA").unwrap();
    let source = CredentialSource::detect(None, &env);
    assert_eq!(
        source,
        CredentialSource::ServiceAccount {
            dir: dir.path().into()
        }
    );
    let creds = source.load().unwrap();
    assert_eq!(creds.bearer_token, b"sa-token");
    assert_eq!(creds.ca_data, b"SA CA");
    assert_eq!(creds.server, None);
    // --kubeconfig wins over the pod.
    let explicit = CredentialSource::detect(Some("k".into()), &env);
    assert_eq!(explicit, CredentialSource::Kubeconfig { path: "k".into() });
}

#[tokio::test]
async fn the_watcher_publishes_changes() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), "one").unwrap();
    let loader = Loader {
        token: TokenSource::Literal("agent".into()),
        source: CredentialSource::ServiceAccount {
            dir: dir.path().into(),
        },
        handed: Default::default(),
    };
    let poke = Arc::new(Notify::new());
    let mut rx = watch(
        loader.clone(),
        loader.load().unwrap(),
        Duration::from_secs(3600),
        poke.clone(),
    );
    // Unchanged: nothing published.
    poke.notify_one();
    assert!(
        tokio::time::timeout(Duration::from_millis(200), rx.changed())
            .await
            .is_err()
    );
    std::fs::write(dir.path().join("token"), "two").unwrap();
    poke.notify_one();
    tokio::time::timeout(Duration::from_secs(5), rx.changed())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rx.borrow().credentials.bearer_token, b"two");
    // A handed token wins over the configured one, re-read after re-read.
    loader.handed.set("handed".into());
    poke.notify_one();
    tokio::time::timeout(Duration::from_secs(5), rx.changed())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rx.borrow().token, "handed");
    assert_eq!(loader.load().unwrap().token, "handed");
    // A broken re-read keeps the current material.
    std::fs::remove_file(dir.path().join("token")).unwrap();
    poke.notify_one();
    assert!(
        tokio::time::timeout(Duration::from_millis(200), rx.changed())
            .await
            .is_err()
    );
    assert_eq!(rx.borrow().credentials.bearer_token, b"two");
}
