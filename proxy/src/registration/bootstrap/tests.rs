use k8s_openapi::ByteString;

use super::*;

const TOKEN: &str = "abcdef.0123456789abcdef";

fn secret(data: &[(&str, &str)], annotations: &[(&str, &str)]) -> Secret {
    let mut s = Secret {
        type_: Some(SECRET_TYPE.into()),
        data: Some(
            data.iter()
                .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                .collect(),
        ),
        ..Default::default()
    };
    s.metadata.annotations = Some(
        annotations
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    );
    s
}

fn good(extra: &[(&str, &str)]) -> Secret {
    let mut data = vec![
        ("token-id", "abcdef"),
        ("token-secret", "0123456789abcdef"),
        (USAGE_KEY, "true"),
    ];
    data.extend_from_slice(extra);
    secret(&data, &[])
}

fn now() -> jiff::Timestamp {
    "2030-01-01T00:00:00Z".parse().unwrap()
}

#[test]
fn the_shape_is_kubernetes_bootstrap_tokens() {
    assert_eq!(Token::parse(TOKEN).unwrap().id, "abcdef");
    assert_eq!(
        Token::parse(TOKEN).unwrap().secret_name(),
        "bootstrap-token-abcdef"
    );
    for bad in [
        "",
        "abcdef",
        "abcdef.0123456789abcde",
        "ABCDEF.0123456789abcdef",
        "abcde.0123456789abcdefg",
        "abcdef:0123456789abcdef",
        "abcdef.0123456789abcdef.x",
    ] {
        assert!(Token::parse(bad).is_none(), "{bad}");
    }
    assert!(!format!("{:?}", Token::parse(TOKEN).unwrap()).contains("0123"));
}

#[test]
fn a_good_token_registers_and_the_annotation_approves() {
    let token = Token::parse(TOKEN).unwrap();
    let valid = check(&token, Some(&good(&[])), now()).unwrap();
    assert_eq!(
        valid,
        Valid {
            id: "abcdef".into(),
            auto_approve: false
        }
    );
    let mut auto = good(&[("expiration", "2031-01-01T00:00:00Z")]);
    auto.metadata.annotations = Some([(AUTO_APPROVE.to_string(), "true".to_string())].into());
    assert!(check(&token, Some(&auto), now()).unwrap().auto_approve);
}

#[test]
fn unknown_wrong_and_foreign_tokens_get_one_answer() {
    let token = Token::parse(TOKEN).unwrap();
    let unknown = Err(Refusal::Unknown("abcdef".into()));
    assert_eq!(check(&token, None, now()), unknown);
    let wrong = Token::parse("abcdef.ffffffffffffffff").unwrap();
    assert_eq!(check(&wrong, Some(&good(&[])), now()), unknown);
    let mut opaque = good(&[]);
    opaque.type_ = Some("Opaque".into());
    assert_eq!(check(&token, Some(&opaque), now()), unknown);
    // Even an expired one: the wrong secret part learns nothing more.
    let expired = good(&[("expiration", "2020-01-01T00:00:00Z")]);
    assert_eq!(check(&wrong, Some(&expired), now()), unknown);
}

#[test]
fn expired_and_not_for_tower_say_so() {
    let token = Token::parse(TOKEN).unwrap();
    let expired = good(&[("expiration", "2020-01-01T00:00:00Z")]);
    let err = check(&token, Some(&expired), now()).unwrap_err();
    assert!(matches!(err, Refusal::Expired { .. }));
    assert!(
        err.to_string().contains("expired at 2020-01-01T00:00:00Z"),
        "{err}"
    );
    let garbled = good(&[("expiration", "soon")]);
    assert!(matches!(
        check(&token, Some(&garbled), now()),
        Err(Refusal::Expired { .. })
    ));
    let nodes_only = secret(
        &[("token-id", "abcdef"), ("token-secret", "0123456789abcdef")],
        &[],
    );
    let err = check(&token, Some(&nodes_only), now()).unwrap_err();
    assert_eq!(err, Refusal::NotForTower("abcdef".into()));
    assert!(err.to_string().contains("usage-bootstrap-tower"), "{err}");
}

#[test]
fn refusals_never_carry_the_secret_part() {
    for refusal in [
        Refusal::Malformed,
        Refusal::Unknown("abcdef".into()),
        Refusal::Expired {
            id: "abcdef".into(),
            at: "x".into(),
        },
        Refusal::NotForTower("abcdef".into()),
    ] {
        let text = refusal.to_string();
        assert!(text.starts_with("registration refused: "), "{text}");
        assert!(!text.contains("0123456789abcdef"), "{text}");
    }
}
