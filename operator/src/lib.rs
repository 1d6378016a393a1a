//! dchat-operator: runs dchat relay clusters declared as `DchatCluster` objects.
#![forbid(unsafe_code)]
