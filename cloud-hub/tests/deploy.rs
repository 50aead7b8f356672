//! The container and Kubernetes files in deploy/ parse and hang together (no container
//! engine or cluster runs here, so this is what can be checked).

use std::collections::BTreeSet;
use std::path::Path;
use yaml_rust2::{Yaml, YamlLoader};

fn deploy() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

#[test]
fn kubernetes_manifests_parse_and_reference_each_other() {
    let mut kinds = BTreeSet::new();
    let mut config_maps = BTreeSet::new();
    let mut secrets = BTreeSet::new();
    let mut referenced = Vec::new();
    for name in ["hub.yaml", "mosquitto.yaml", "postgres.yaml"] {
        let path = deploy().join("k8s").join(name);
        let text = std::fs::read_to_string(&path).unwrap();
        let docs = YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(!docs.is_empty(), "{name} is empty");
        for d in &docs {
            let kind = d["kind"]
                .as_str()
                .unwrap_or_else(|| panic!("{name}: a document without kind"));
            assert!(
                d["apiVersion"].as_str().is_some(),
                "{name}: {kind} without apiVersion"
            );
            let meta = d["metadata"]["name"]
                .as_str()
                .unwrap_or_else(|| panic!("{name}: {kind} without a name"));
            kinds.insert(format!("{kind}/{meta}"));
            match kind {
                "ConfigMap" => {
                    config_maps.insert(meta.to_string());
                }
                "Secret" => {
                    secrets.insert(meta.to_string());
                }
                "StatefulSet" => {
                    let spec = &d["spec"]["template"]["spec"];
                    for v in spec["volumes"].as_vec().into_iter().flatten() {
                        if let Some(cm) = v["configMap"]["name"].as_str() {
                            referenced.push(("ConfigMap", cm.to_string()));
                        }
                    }
                    for c in spec["containers"].as_vec().unwrap() {
                        assert!(
                            c["image"].as_str().is_some(),
                            "{meta}: container without image"
                        );
                        for e in c["envFrom"].as_vec().into_iter().flatten() {
                            if let Some(s) = e["secretRef"]["name"].as_str() {
                                referenced.push(("Secret", s.to_string()));
                            }
                        }
                        for e in c["env"].as_vec().into_iter().flatten() {
                            if let Some(s) = e["valueFrom"]["secretKeyRef"]["name"].as_str() {
                                referenced.push(("Secret", s.to_string()));
                            }
                        }
                    }
                    let labels = &d["spec"]["selector"]["matchLabels"];
                    assert_eq!(
                        labels, &d["spec"]["template"]["metadata"]["labels"],
                        "{meta}: selector does not match the pod labels"
                    );
                }
                _ => {}
            }
        }
    }
    for want in [
        "StatefulSet/cloud-hub",
        "StatefulSet/mosquitto",
        "StatefulSet/postgres",
        "Service/cloud-hub",
        "Service/mosquitto",
        "Service/postgres",
    ] {
        assert!(kinds.contains(want), "missing {want}: {kinds:?}");
    }
    for (kind, name) in referenced {
        let known = if kind == "Secret" {
            &secrets
        } else {
            &config_maps
        };
        assert!(
            known.contains(&name),
            "{kind} {name} is referenced but not defined"
        );
    }
    // The hub's embedded config names the services defined here.
    let hub =
        YamlLoader::load_from_str(&std::fs::read_to_string(deploy().join("k8s/hub.yaml")).unwrap())
            .unwrap();
    let toml = hub
        .iter()
        .find(|d| d["kind"] == Yaml::from_str("ConfigMap"))
        .and_then(|d| d["data"]["hub.toml"].as_str())
        .unwrap();
    assert!(toml.contains("host = \"mosquitto\""), "{toml}");
    let mosquitto = std::fs::read_to_string(deploy().join("k8s/mosquitto.yaml")).unwrap();
    assert!(mosquitto.contains("message_size_limit 16777216"));
}

#[test]
fn dockerfile_builds_the_hub_and_ships_the_config() {
    let text = std::fs::read_to_string(deploy().join("hub/Dockerfile")).unwrap();
    assert!(text.contains("cargo build --release -p cloud-hub"));
    assert!(text.contains("COPY deploy/hub/hub.toml"));
    assert!(deploy().join("hub/hub.toml").is_file());
    assert!(text.contains("ENTRYPOINT [\"/usr/local/bin/cloud-hub\", \"serve\""));
}

#[test]
fn kubernetes_mosquitto_config_is_the_shipped_tls_config() {
    let docs = YamlLoader::load_from_str(
        &std::fs::read_to_string(deploy().join("k8s/mosquitto.yaml")).unwrap(),
    )
    .unwrap();
    let config = docs
        .iter()
        .find(|d| d["kind"] == Yaml::from_str("ConfigMap"))
        .unwrap();
    for file in ["mosquitto.conf", "acl"] {
        let shipped = std::fs::read_to_string(deploy().join("mosquitto").join(file)).unwrap();
        assert_eq!(
            config["data"][file].as_str(),
            Some(shipped.as_str()),
            "k8s/mosquitto.yaml's {file} differs from deploy/mosquitto/{file}"
        );
    }
    let conf = std::fs::read_to_string(deploy().join("mosquitto/mosquitto.conf")).unwrap();
    for line in [
        "listener 8883",
        "require_certificate true",
        "use_identity_as_username true",
        "allow_anonymous false",
        "crlfile /mosquitto/pki/crl.pem",
        "acl_file /mosquitto/config/acl",
    ] {
        assert!(conf.lines().any(|l| l == line), "missing {line:?}");
    }
    assert!(!conf.contains("allow_anonymous true"));
    // The hub connects over TLS with its own identity.
    let hub = std::fs::read_to_string(deploy().join("k8s/hub.yaml")).unwrap();
    assert!(
        hub.contains("port = 8883") && hub.contains("[mqtt.tls]"),
        "{hub}"
    );
}
