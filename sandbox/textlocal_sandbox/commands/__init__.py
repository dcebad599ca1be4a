"""Every TextLocal command the sandbox answers, by name: pure functions of (context, params)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from textlocal_sandbox.commands import account, contacts, reports, scheduling, sending
from textlocal_sandbox.commands.context import Command, CommandContext, Reply

COMMANDS: Final[Mapping[str, Command]] = {
    "send": sending.send,
    "send_mms": sending.send_mms,
    "bulk_json": sending.bulk_json,
    "get_scheduled": scheduling.get_scheduled,
    "cancel_scheduled": scheduling.cancel_scheduled,
    "get_groups": contacts.get_groups,
    "create_group": contacts.create_group,
    "delete_group": contacts.delete_group,
    "get_contacts": contacts.get_contacts,
    "create_contacts": contacts.create_contacts,
    "create_contacts_bulk": contacts.create_contacts_bulk,
    "delete_contact": contacts.delete_contact,
    "get_optouts": contacts.get_optouts,
    "status_batch": reports.status_batch,
    "status_message": reports.status_message,
    "get_history_group": reports.get_history_group,
    "get_history_single": reports.get_history_single,
    "get_history_api": reports.get_history_api,
    "balance": account.balance,
    "get_sender_names": account.get_sender_names,
    "get_templates": account.get_templates,
    "get_inboxes": account.get_inboxes,
    "get_messages": account.get_messages,
    "check_keyword": account.check_keyword,
    "create_shorturl": account.create_shorturl,
}

__all__ = ["COMMANDS", "Command", "CommandContext", "Reply"]
