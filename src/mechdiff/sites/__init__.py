"""Sites: uniform names (names), hook context managers (hooks), batched capture (capture)."""
from mechdiff.sites.capture import Captured, capture, validated
from mechdiff.sites.logits import capture_logits
from mechdiff.sites.hooks import (Recording, StopForward, add_at, hooked, intervene, project_out_at,
                                  record, replace_at, validate_sites)
from mechdiff.sites.names import (READ_ONLY, SITE_NAMES, Site, SiteMap, parse_site, resolve, site_str,
                                  sites_at)

__all__ = [
    "SITE_NAMES", "READ_ONLY", "Site", "SiteMap", "parse_site", "resolve", "site_str", "sites_at",
    "Recording", "StopForward", "hooked", "record", "intervene", "replace_at", "add_at",
    "project_out_at", "validate_sites",
    "Captured", "capture", "capture_logits", "validated",
]
