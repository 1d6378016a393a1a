//! Reads what the status screen shows: the DchatCluster (which must exist and be
//! readable) and, concurrently, its StatefulSets, autoscaler, disruption budget,
//! backups and Events (each of which may be unreadable on its own).

use dchat_operator::api::{DchatBackup, DchatCluster, Slot};
use dchat_operator::backup::job::CLUSTER_LABEL;
use dchat_operator::labels;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::Event;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, ListParams};
use kube::core::{ApiResource, DynamicObject};
use kube::Client;

use super::{Section, Snapshot};
use crate::error::Error;
use crate::view::ClusterView;

/// The DchatCluster `name` in `namespace`, read as a raw object (see [`crate::view`]).
pub async fn cluster(client: &Client, namespace: &str, name: &str) -> Result<ClusterView, Error> {
    let resource = ApiResource::erase::<DchatCluster>(&());
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &resource);
    let object = api
        .get_opt(name)
        .await
        .map_err(|e| Error::api(format!("reading DchatCluster \"{name}\""), namespace, e))?
        .ok_or_else(|| Error::ClusterNotFound {
            namespace: namespace.to_string(),
            name: name.to_string(),
        })?;
    let raw = serde_json::to_value(&object).map_err(|e| Error::Unreadable {
        what: format!("DchatCluster {namespace}/{name}"),
        message: e.to_string(),
    })?;
    ClusterView::from_value(raw)
}

/// Everything the status screen of `name` shows.
pub async fn snapshot(client: &Client, namespace: &str, name: &str) -> Result<Snapshot, Error> {
    let cluster = cluster(client, namespace, name).await?;
    let stub = cluster.stub();
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), namespace);
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(client.clone(), namespace);
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), namespace);
    let backups: Api<DchatBackup> = Api::namespaced(client.clone(), namespace);
    let events: Api<Event> = Api::namespaced(client.clone(), namespace);
    let single = labels::cluster_object_name(&stub);

    let statefulsets = async {
        let mut found = Vec::new();
        for slot in Slot::ALL {
            if let Some(set) = sets.get_opt(&labels::statefulset_name(&stub, slot)).await? {
                found.push(set);
            }
        }
        Ok::<_, kube::Error>(found)
    };
    let backup_list = async {
        let params = ListParams::default().labels(&format!("{CLUSTER_LABEL}={name}"));
        Ok::<_, kube::Error>(backups.list(&params).await?.items)
    };
    let event_list = async {
        // Events of this object, not of an older DchatCluster of the same name.
        let mut selector = format!("involvedObject.kind=DchatCluster,involvedObject.name={name}");
        if let Some(uid) = &cluster.uid {
            selector.push_str(&format!(",involvedObject.uid={uid}"));
        }
        let params = ListParams::default().fields(&selector);
        Ok::<_, kube::Error>(events.list(&params).await?.items)
    };
    let (statefulsets, autoscaler, disruption_budget, backups, events) = tokio::join!(
        statefulsets,
        hpas.get_opt(&single),
        pdbs.get_opt(&single),
        backup_list,
        event_list,
    );
    Ok(Snapshot {
        statefulsets: section(statefulsets),
        autoscaler: section(autoscaler),
        disruption_budget: section(disruption_budget),
        backups: section(backups),
        events: section(events),
        cluster,
    })
}

/// A part of the screen, or why it could not be read.
fn section<T>(result: Result<T, kube::Error>) -> Section<T> {
    match result {
        Ok(value) => Section::Shown(value),
        Err(kube::Error::Api(status)) if status.is_forbidden() => Section::Unavailable {
            unavailable: format!("forbidden: {}", status.message),
        },
        Err(e) => Section::Unavailable {
            unavailable: e.to_string(),
        },
    }
}
