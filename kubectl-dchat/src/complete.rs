//! Shell completion.
//!
//! Two ways: `kubectl dchat completion bash|zsh|fish` prints a clap-generated script
//! for the `kubectl-dchat` binary, and `completion kubectl` prints the
//! `kubectl_complete-dchat` script through which kubectl (1.26+) completes
//! `kubectl dchat <TAB>` itself. kubectl runs that script with the words typed after
//! `kubectl dchat`, the last one being the word to complete, and reads candidates one
//! per line followed by `:<directive>` (the protocol of kubectl's own completion).
//! The script calls `kubectl-dchat __complete`, answered here: [`need`] decides what
//! the word is (pure), [`answer`] looks cluster-side names up.

use clap::CommandFactory;

use crate::cli::{Cli, KubeFlags};

/// The `kubectl_complete-dchat` script (also shipped as a file in the release archives).
pub const KUBECTL_COMPLETE_SCRIPT: &str = include_str!("../kubectl_complete-dchat");

/// Hidden first argument that asks for completions.
pub const COMPLETE_ARG: &str = "__complete";

/// Directive: complete only from the candidates, no file names.
const NO_FILE_COMPLETION: u32 = 4;
/// Directive: the shell's default (file names), for `--kubeconfig`.
const DEFAULT_COMPLETION: u32 = 0;

/// What the word being completed is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Need {
    /// One of these (already filtered by the typed prefix).
    Words(Vec<String>),
    /// A DchatCluster name in the namespace the flags name.
    Clusters(KubeFlags),
    /// A namespace.
    Namespaces(KubeFlags),
    /// A kubeconfig context.
    Contexts(KubeFlags),
    /// A file name (the shell completes it).
    File,
}

const VALUE_FLAGS: &[&str] = &[
    "-n",
    "--namespace",
    "--context",
    "--kubeconfig",
    "-o",
    "--output",
    "--timeout",
    "--operator-namespace",
];

/// What completes the last of `args` (the words after `kubectl dchat`).
pub fn need(args: &[String]) -> Need {
    let (current, before) = match args.split_last() {
        Some((last, before)) => (last.as_str(), before),
        None => ("", &[][..]),
    };
    let mut flags = KubeFlags::default();
    let mut positionals: Vec<&str> = Vec::new();
    let mut i = 0;
    while i < before.len() {
        let word = before[i].as_str();
        if let Some((flag, value)) = word.split_once('=').filter(|(f, _)| f.starts_with('-')) {
            set_flag(&mut flags, flag, value);
        } else if VALUE_FLAGS.contains(&word) {
            if let Some(value) = before.get(i + 1) {
                set_flag(&mut flags, word, value);
            }
            i += 1;
        } else if !word.starts_with('-') {
            positionals.push(word);
        }
        i += 1;
    }
    let previous = before.last().map(String::as_str).unwrap_or("");
    if VALUE_FLAGS.contains(&previous) {
        return match previous {
            "-n" | "--namespace" | "--operator-namespace" => Need::Namespaces(flags),
            "--context" => Need::Contexts(flags),
            "--kubeconfig" => Need::File,
            "-o" | "--output" => words(&["json", "yaml"], current),
            _ => Need::Words(vec![]),
        };
    }
    let command = Cli::command();
    let sub = positionals
        .first()
        .and_then(|name| command.find_subcommand(name));
    if current.starts_with('-') {
        let mut names = flag_names(&command);
        if let Some(sub) = sub {
            names.extend(flag_names(sub));
        }
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        return words(&refs, current);
    }
    let Some(sub) = sub else {
        let names: Vec<&str> = command
            .get_subcommands()
            .filter(|s| !s.is_hide_set() && s.get_name() != "help")
            .map(|s| s.get_name())
            .collect();
        return words(&names, current);
    };
    match sub.get_name() {
        "completion" if positionals.len() == 1 => {
            words(&["bash", "zsh", "fish", "kubectl"], current)
        }
        "completion" | "version" => Need::Words(vec![]),
        _ if positionals.len() == 1 => Need::Clusters(flags),
        _ => Need::Words(vec![]),
    }
}

fn set_flag(flags: &mut KubeFlags, flag: &str, value: &str) {
    match flag {
        "-n" | "--namespace" => flags.namespace = Some(value.to_string()),
        "--context" => flags.context = Some(value.to_string()),
        "--kubeconfig" => flags.kubeconfig = Some(value.into()),
        _ => {}
    }
}

fn flag_names(command: &clap::Command) -> Vec<String> {
    command
        .get_arguments()
        .filter(|a| !a.is_hide_set())
        .filter_map(|a| a.get_long().map(|l| format!("--{l}")))
        .collect()
}

fn words(candidates: &[&str], prefix: &str) -> Need {
    Need::Words(
        candidates
            .iter()
            .filter(|c| c.starts_with(prefix))
            .map(|c| c.to_string())
            .collect(),
    )
}

/// The answer to `__complete args...` in kubectl's protocol. Cluster-side lookups that
/// fail (no cluster, forbidden) complete nothing rather than print an error.
pub async fn answer(args: &[String]) -> String {
    let current = args.last().map(String::as_str).unwrap_or("");
    let (mut candidates, directive) = match need(args) {
        Need::Words(list) => (list, NO_FILE_COMPLETION),
        Need::File => (vec![], DEFAULT_COMPLETION),
        Need::Contexts(flags) => (contexts(&flags), NO_FILE_COMPLETION),
        Need::Namespaces(flags) => (namespaces(&flags).await, NO_FILE_COMPLETION),
        Need::Clusters(flags) => (clusters(&flags).await, NO_FILE_COMPLETION),
    };
    candidates.retain(|c| c.starts_with(current));
    let mut out = String::new();
    for c in candidates {
        out.push_str(&c);
        out.push('\n');
    }
    out.push_str(&format!(":{directive}\n"));
    out
}

fn contexts(flags: &KubeFlags) -> Vec<String> {
    let config = match &flags.kubeconfig {
        Some(path) => kube::config::Kubeconfig::read_from(path),
        None => kube::config::Kubeconfig::read(),
    };
    config
        .map(|c| c.contexts.into_iter().map(|c| c.name).collect())
        .unwrap_or_default()
}

async fn namespaces(flags: &KubeFlags) -> Vec<String> {
    let Ok(conn) = crate::connect::connect(flags).await else {
        return vec![];
    };
    let api: kube::Api<k8s_openapi::api::core::v1::Namespace> = kube::Api::all(conn.client);
    names(api).await
}

async fn clusters(flags: &KubeFlags) -> Vec<String> {
    let Ok(conn) = crate::connect::connect(flags).await else {
        return vec![];
    };
    let resource = kube::core::ApiResource::erase::<dchat_operator::api::DchatCluster>(&());
    let api: kube::Api<kube::core::PartialObjectMeta<kube::core::DynamicObject>> =
        kube::Api::namespaced_with(conn.client, &conn.namespace, &resource);
    names(api).await
}

async fn names<K>(api: kube::Api<K>) -> Vec<String>
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned,
{
    match api.list_metadata(&kube::api::ListParams::default()).await {
        Ok(list) => list
            .items
            .into_iter()
            .filter_map(|o| o.metadata.name)
            .collect(),
        Err(_) => vec![],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn need_of(words: &[&str]) -> Need {
        need(&words.iter().map(|w| w.to_string()).collect::<Vec<_>>())
    }

    fn list(words: &[&str]) -> Need {
        Need::Words(words.iter().map(|w| w.to_string()).collect())
    }

    #[test]
    fn the_first_word_is_a_subcommand() {
        assert_eq!(need_of(&["p"]), list(&["promote", "pause"]));
        let Need::Words(all) = need_of(&[""]) else {
            panic!()
        };
        assert!(all.contains(&"status".to_string()) && all.contains(&"wake".to_string()));
        assert!(!all.contains(&"help".to_string()));
    }

    #[test]
    fn a_subcommands_argument_is_a_cluster_in_the_flags_namespace() {
        let Need::Clusters(flags) = need_of(&["-n", "prod", "--context=eu", "status", "ch"]) else {
            panic!("clusters")
        };
        assert_eq!(flags.namespace.as_deref(), Some("prod"));
        assert_eq!(flags.context.as_deref(), Some("eu"));
        assert_eq!(need_of(&["status", "chat", ""]), list(&[]));
    }

    #[test]
    fn flag_values_complete_by_kind() {
        assert!(matches!(
            need_of(&["status", "-n", ""]),
            Need::Namespaces(_)
        ));
        assert!(matches!(need_of(&["--context", ""]), Need::Contexts(_)));
        assert_eq!(need_of(&["--kubeconfig", ""]), Need::File);
        assert_eq!(need_of(&["status", "chat", "-o", "j"]), list(&["json"]));
        assert_eq!(
            need_of(&["completion", ""]),
            list(&["bash", "zsh", "fish", "kubectl"])
        );
    }

    #[test]
    fn flags_of_the_subcommand_and_global_ones() {
        let Need::Words(flags) = need_of(&["promote", "chat", "--"]) else {
            panic!()
        };
        for flag in [
            "--wait",
            "--timeout",
            "--namespace",
            "--context",
            "--kubeconfig",
        ] {
            assert!(flags.contains(&flag.to_string()), "{flag} in {flags:?}");
        }
    }

    #[tokio::test]
    async fn the_answer_ends_with_the_directive() {
        let args: Vec<String> = vec!["hib".into()];
        assert_eq!(answer(&args).await, "hibernate\n:4\n");
        let args: Vec<String> = vec!["--kubeconfig".into(), "".into()];
        assert_eq!(answer(&args).await, ":0\n");
    }
}
